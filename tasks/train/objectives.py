"""What each `train.objective` needs: lengths, checks, datasets, collators, batch order.

One silver table serves all three objectives, so everything objective-specific is decided here,
at training time: how long chunks are (span corruption computes the raw length that corrupts into
exactly `model.max_source_length`), whether the model's tokenizer can do it (sentinels, `<mask>`,
pairs), how rows become examples (packed chunks, or truncated pairs), which collator draws the
noise, and in which order supervised pairs are batched (length-grouped, per rank).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from tasks.params import TrainParams
from tasks.train.data import TrainingError, split_by_row_id
from tasks.train.noise import (
    DenoisingCollator,
    SpanCorruptionCollator,
    compute_t5_input_and_target_lengths,
)
from tasks.train.packing import SupervisedCollator, pack_documents

MIN_DENOISING_LENGTH = 8
SENTENCE_ENDS = {".", "!", "?", "。", "！", "？", "؟", "।"}


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... present in the tokenizer."""
    vocab = tokenizer.get_vocab()
    out = []
    while f"<extra_id_{len(out)}>" in vocab:
        out.append(vocab[f"<extra_id_{len(out)}>"])
    return out


@dataclass(frozen=True)
class Lengths:
    """Token lengths of one objective: packed chunks (0 for pairs), encoder and label lengths."""

    chunk_length: int
    input_length: int
    target_length: int


def objective_lengths(
    objective: str,
    max_source_length: int,
    max_target_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> Lengths:
    """Chunk and model lengths for the objective; TrainingError when they are too small."""
    if objective == "span_corruption":
        raw, target = compute_t5_input_and_target_lengths(
            max_source_length, noise_density, mean_noise_span_length
        )
        if raw < 4 or target < 2:
            raise TrainingError(
                f"model.max_source_length={max_source_length} is too small for "
                "span corruption: use at least 16"
            )
        if max_target_length < target:
            raise TrainingError(
                f"lengths too small: span corruption of model.max_source_length="
                f"{max_source_length} gives targets of {target} tokens, but "
                f"model.max_target_length={max_target_length}; set model.max_target_length>="
                f"{target} (or lower max_source_length)"
            )
        return Lengths(chunk_length=raw, input_length=max_source_length, target_length=target)
    if objective == "denoising":
        chunk = max_source_length - 2  # room for </s> and the language code
        if chunk < MIN_DENOISING_LENGTH:
            raise TrainingError(
                f"lengths too small: denoising needs model.max_source_length>="
                f"{MIN_DENOISING_LENGTH + 2}, got {max_source_length}"
            )
        if max_target_length < max_source_length:
            raise TrainingError(
                f"lengths too small: denoising reconstructs the whole chunk, so "
                f"model.max_target_length={max_target_length} must be >= "
                f"model.max_source_length={max_source_length}"
            )
        return Lengths(
            chunk_length=chunk, input_length=max_source_length, target_length=max_source_length
        )
    if max_source_length < 2 or max_target_length < 2:
        raise TrainingError(
            "lengths too small: supervised needs max_source_length and "
            "max_target_length of at least 2"
        )
    return Lengths(chunk_length=0, input_length=max_source_length, target_length=max_target_length)


def check_objective(
    objective: str,
    tokenizer,
    columns: set[str],
    model_name: str,
    max_source_length: int,
    noise_density: float,
    mean_noise_span_length: float,
) -> None:
    """Raise a TrainingError when the objective does not fit the model or the silver."""
    if objective == "span_corruption":
        sentinels = sentinel_ids(tokenizer)
        if not sentinels:
            raise TrainingError(
                f"train.objective=span_corruption needs T5 sentinel tokens (<extra_id_0>...), "
                f"which the tokenizer of {model_name} lacks: use a T5/mT5 model or "
                "train.objective=denoising (mBART) / supervised"
            )
        raw, _ = compute_t5_input_and_target_lengths(
            max_source_length, noise_density, mean_noise_span_length
        )
        spans = max(1, round(round(raw * noise_density) / mean_noise_span_length))
        if spans > len(sentinels):
            raise TrainingError(
                f"model.max_source_length={max_source_length} needs {spans} sentinels per "
                f"example but the tokenizer has {len(sentinels)}: lower max_source_length"
            )
    elif objective == "denoising":
        if tokenizer.mask_token_id is None:
            raise TrainingError(
                f"train.objective=denoising needs a <mask> token, which the tokenizer of "
                f"{model_name} lacks: use a BART/mBART model or train.objective=span_corruption"
            )
    elif objective == "supervised":
        if columns and "labels" not in columns:
            raise TrainingError(
                "train.objective=supervised needs source/target pairs, but this silver has no "
                "`labels` column: ingest pairs with source.target_column set and rebuild silver"
            )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise TrainingError(f"the tokenizer of {model_name} has no EOS or pad token")


def language_code_id(tokenizer, docs: list[list[int]]) -> int | None:
    """The language code an mBART tokenizer appended after `</s>` in silver, if any."""
    specials = set(tokenizer.all_special_ids) - {
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
    }
    tails = Counter(d[-1] for d in docs if len(d) >= 2 and d[-2] == tokenizer.eos_token_id)
    for token, _ in tails.most_common():
        if token in specials:
            return int(token)
    return None


def sentence_end_ids(tokenizer) -> list[int]:
    """Ids of pieces that end a sentence (".", "▁.", "!", ...)."""
    return sorted(
        i for piece, i in tokenizer.get_vocab().items() if piece.lstrip("▁Ġ") in SENTENCE_ENDS
    )


def _pack_batch(
    batch: dict[str, list], chunk_length: int, eos_id: int, drop_ids: list[int]
) -> dict[str, list]:
    chunks = list(pack_documents(batch["input_ids"], chunk_length, eos_id, drop_ids))
    return {"input_ids": chunks}


def _truncate_pairs(
    batch: dict[str, list], max_source: int, max_target: int, eos_id: int
) -> dict[str, list]:
    def cut(ids: list[int], n: int) -> list[int]:
        # Keep the final EOS (and an mBART language code after it) when truncating.
        if len(ids) <= n:
            return list(ids)
        tail = ids[ids.index(eos_id, max(0, len(ids) - 2)) :] if eos_id in ids[-2:] else []
        return list(ids[: n - len(tail)]) + list(tail)

    src = [cut(x, max_source) for x in batch["input_ids"]]
    tgt = [cut(y, max_target) for y in batch["labels"]]
    # Inputs and labels pad separately: `length` carries both (see pair_batch_order).
    return {
        "input_ids": src,
        "labels": tgt,
        "length": [len(b) * PAIR_LENGTH_BASE + len(a) for a, b in zip(src, tgt, strict=True)],
    }


PAIR_LENGTH_BASE = 1 << 16  # `length` = label length * base + input length
PAIR_WINDOW = 4  # batches whose inputs are re-sorted together after the sort by label length


def pair_batch_order(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """Indices in batches of similar input *and* label lengths, batches in random order.

    Inputs and labels are padded separately, so sorting by one length leaves the other ragged
    (Trainer's `group_by_length` sorts by one number within mega-batches of 50 batches and
    keeps them in length order). Here: sort everything by label length, then input length
    (ties in random order), re-sort windows of `PAIR_WINDOW` batches by input length, cut into
    batches and shuffle the batches; the largest batch goes first (memory errors show at
    once) and a short last batch goes last (so every full batch stays aligned with the steps
    and the ranks). The fill this gives is measured in README's training section.
    """
    n = len(lengths)
    if n == 0:
        return []
    key = np.asarray(lengths, dtype=np.int64)
    label, source = key // PAIR_LENGTH_BASE, key % PAIR_LENGTH_BASE
    perm = torch.randperm(n, generator=generator).numpy()
    order = perm[np.lexsort((source[perm], label[perm]))]
    window = PAIR_WINDOW * batch_size
    for i in range(0, n, window):
        part = order[i : i + window]
        order[i : i + window] = part[np.argsort(source[part], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    full = [b for b in shuffled if len(b) == batch_size]
    short = [b for b in shuffled if len(b) < batch_size]
    if full:
        largest = max(
            range(len(full)),
            key=lambda j: label[full[j]].max() + source[full[j]].max(),
        )
        full[0], full[largest] = full[largest], full[0]
    return np.concatenate(full + short).tolist()


class PairLengthSampler(Sampler[int]):
    """Trainer's sampler for supervised pairs: `pair_batch_order` over global batches.

    Every rank builds the same order from a generator seeded by (seed, epoch), never from a
    process's own RNG (dropout draws from that, differently on each rank). accelerate deals
    micro-batch i to rank i % world_size, so each rank trains on length-grouped slices of every
    global batch, and a step's global batch holds the same rows whatever the process count.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Trainer (through accelerate's data loader) calls this at every epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        return iter(pair_batch_order(self.lengths, self.global_batch, generator))


def build_datasets(
    ds,
    *,
    objective: str,
    tokenizer,
    lengths: Lengths,
    eval_fraction: float,
    max_eval_samples: int,
    drop_ids: Sequence[int] = (),
) -> tuple[Any, Any]:
    """(train, eval) datasets ready for the objective's collator."""
    train, evals = split_by_row_id(ds, eval_fraction, max_eval_samples)
    eos = tokenizer.eos_token_id
    out = []
    for part in (train, evals):
        if objective == "supervised":
            part = part.map(
                _truncate_pairs,
                batched=True,
                batch_size=2000,
                remove_columns=part.column_names,
                desc="truncate pairs",
                fn_kwargs={
                    "max_source": lengths.input_length,
                    "max_target": lengths.target_length,
                    "eos_id": eos,
                },
            )
        else:
            # Batched map packs within 2,000-document slices (one partial chunk lost per
            # slice, as run_t5_mlm_flax's group_texts); cached by datasets' fingerprint.
            part = part.map(
                _pack_batch,
                batched=True,
                batch_size=2000,
                remove_columns=part.column_names,
                desc="pack documents",
                fn_kwargs={
                    "chunk_length": lengths.chunk_length,
                    "eos_id": eos,
                    "drop_ids": list(drop_ids),
                },
            )
        out.append(part)
    train, evals = out
    if len(train) == 0:
        unit = "pairs" if objective == "supervised" else f"chunks of {lengths.chunk_length} tokens"
        raise TrainingError(
            f"silver gives no training {unit} ({len(ds)} rows, {len(evals)} held out for eval): "
            "add data (bronze, silver) or lower model.max_source_length / train.eval_fraction"
        )
    return train, evals


def build_collators(
    *,
    tokenizer,
    lengths: Lengths,
    train: TrainParams,
    lang_id: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Callable, Callable]:
    """(train collator, eval collator): separate instances so eval noise stays fixed."""

    def make(seed: int) -> Callable:
        if train.objective == "span_corruption":
            return SpanCorruptionCollator(
                sentinel_ids(tokenizer),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                lengths.input_length,
                lengths.target_length,
                noise_density=train.noise_density,
                mean_noise_span_length=train.mean_noise_span_length,
                seed=seed,
                rank=rank,
                world_size=world_size,
            )
        if train.objective == "denoising":
            return DenoisingCollator(
                tokenizer.mask_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                lang_id,
                sentence_end_ids(tokenizer),
                mask_ratio=train.mask_ratio,
                poisson_lambda=train.poisson_lambda,
                seed=seed,
                rank=rank,
                world_size=world_size,
            )
        return SupervisedCollator(tokenizer.pad_token_id)

    return make(train.seed), make(train.seed + 1)
