"""Noise drawn at training time: T5 span corruption and BART/mBART denoising.

Silver rows hold token ids only (`input_ids`, and `labels` for pairs). Everything that depends on
randomness happens here, at collate time, with a seeded `numpy.random.Generator`, so one silver
table serves every objective, every epoch sees fresh noise, and a run repeats exactly.

Seeding. Each batch gets its own generator seeded from `(seed, epoch, global batch index)`. A
process counts its batches since the last `set_epoch` call, starting at `start_batch`; inside
DataLoader workers that count is `start_batch + worker_id + num_workers * calls_in_this_worker`,
the process's batch position for map-style datasets (workers take batches round-robin), so the
noise does not depend on `num_workers`. In data-parallel training the rank is part of the seed:
batch `n` of rank `r` out of `world_size` is global batch `n * world_size + r`, so no two ranks
draw the same noise (rows are sharded by rank, but a rank given another's rows must not mask
them alike), one process alone draws exactly what it always did, and a run with the same process
count repeats exactly. The training loop calls `collator.set_epoch(epoch)` at the start of every
epoch (a `TrainerCallback` in `on_epoch_begin`: Trainer does not do it for collators), and
`set_epoch(epoch, start_batch=n)` when it resumes after skipping `n` batches of that epoch, so a
resumed run sees the same noise. Workers copy the collator when an epoch's iteration starts, so
`persistent_workers=True` would not see `set_epoch`; leave it off (the default).

The T5 parts (`compute_t5_input_and_target_lengths`, `random_spans_noise_mask` and the sentinel
logic of `SpanCorruptionCollator`) are ported from Hugging Face's
`examples/flax/language-modeling/run_t5_mlm_flax.py` (Copyright The HuggingFace Team, Apache
License 2.0), itself a port of `t5.data.preprocessors` (Google, Apache License 2.0). The denoising
noise follows fairseq's `DenoisingDataset` (BART, mBART; MIT License).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tasks.train.packing import LABEL_PAD_ID, as_token_list, pad_rows


class SeededCollator:
    """Gives each batch its own generator, seeded from (seed, epoch, global batch index).

    See the module docstring for how the index is counted; `rank` and `world_size` say which
    data-parallel process this collator serves.
    """

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.start_batch = 0
        self._calls = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Re-seed for `epoch`; `start_batch` is how many batches of it a resumed run skipped."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        self._calls = 0

    def _next_rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch_index = self.start_batch + worker + workers * self._calls
        self._calls += 1
        global_index = batch_index * self.world_size + self.rank
        return np.random.default_rng([self.seed, self.epoch, global_index])


# --------------------------------------------------------------------------------------------
# T5 / mT5 span corruption
# --------------------------------------------------------------------------------------------


def compute_t5_input_and_target_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """Raw chunk length that span-corrupts into exactly `inputs_length` input tokens.

    Port of `compute_input_and_target_lengths` in `run_t5_mlm_flax.py` (from T5's
    `random_spans_helper`). Both lengths include the EOS the collator appends. Packing chunks
    of the raw length means no padding at all: every noise span becomes one sentinel in the
    inputs, every non-noise span one sentinel in the targets.

    Returns:
        `(raw_tokens_length, targets_length)`; e.g. 512 -> (568, 114) with the defaults.
    """

    def _tokens_length_to_inputs_length_targets_length(tokens_length: int) -> tuple[int, int]:
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        # inputs contain all nonnoise tokens, sentinels for all noise spans and one EOS token.
        _input_length = num_nonnoise_tokens + num_noise_spans + 1
        _output_length = num_noise_tokens + num_noise_spans + 1
        return _input_length, _output_length

    tokens_length = inputs_length
    while _tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    # minor hack to get the targets length to be equal to inputs length
    # which is more likely to have been set to a nice round number.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _num_noise_tokens_and_spans(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    num_noise_tokens = int(np.round(length * noise_density))
    # avoid degeneracy by ensuring positive numbers of noise and nonnoise tokens.
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_nonnoise_tokens = length - num_noise_tokens
    # HF's fix: never more spans than either kind of token can fill (noise_density > 0.5).
    num_noise_spans = int(
        np.round(min(num_noise_tokens, num_nonnoise_tokens) / mean_noise_span_length)
    )
    # avoid degeneracy by ensuring positive number of noise spans
    return num_noise_tokens, max(num_noise_spans, 1)


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean mask of random noise spans; port of `random_spans_noise_mask` (HF / T5).

    num_noise_tokens = round(length * noise_density); the same number of noise and non-noise
    spans, alternating and starting with non-noise (so the mask never starts with noise and
    always ends with it); subject to that, all masks are equally likely.

    One deliberate difference from the HF copy: the non-noise count is taken after clamping the
    noise count (as T5 does), so degenerate lengths cannot produce an out-of-range mask.
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise_tokens, num_noise_spans = _num_noise_tokens_and_spans(
        length, noise_density, mean_noise_span_length
    )
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        """Partition `num_items` items randomly into `num_segments` non-empty segments."""
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        # count length of sub segments assuming that list is sorted
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(
        np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2]
    )
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    return np.equal(span_num % 2, 1)


class SpanCorruptionCollator(SeededCollator):
    """T5/mT5 span corruption over packed chunks, with exact lengths and no padding.

    Input:  `a b <extra_id_0> e <extra_id_1> h </s>` (non-noise, one sentinel per noise span)
    Labels: `<extra_id_0> c d <extra_id_1> f g </s>` (one sentinel per non-noise span)

    Examples are chunks of `raw_length` tokens (`pack_documents(docs,
    collator.raw_length, eos_id)`). No `decoder_input_ids`: T5 shifts the labels right itself,
    starting from `decoder_start_token_id` (= pad).

    Args:
        sentinel_ids: ids of `<extra_id_0>`, `<extra_id_1>`, ... in that order (in T5/mT5
            vocabularies `<extra_id_0>` has the highest id, so this list is descending in id).
        eos_id: EOS id appended to inputs and labels.
        pad_id: pad id; kept for the throughput metrics, never emitted.
        input_length: encoder length after corruption, including EOS.
        target_length: label length, including EOS; must match `input_length`.
        noise_density: fraction of raw tokens that are noise.
        mean_noise_span_length: mean length of a noise span.
        seed: base seed for the per-batch generators.
        rank, world_size: this process in data-parallel training (part of each batch's seed).
    """

    def __init__(
        self,
        sentinel_ids: Sequence[int],
        eos_id: int,
        pad_id: int,
        input_length: int,
        target_length: int,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(seed, rank, world_size)
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_noise_span_length <= 0:
            raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")
        raw_length, expected_target = compute_t5_input_and_target_lengths(
            input_length, noise_density, mean_noise_span_length
        )
        if target_length != expected_target:
            raise ValueError(
                f"target_length={target_length} does not match input_length={input_length}: "
                f"use compute_t5_input_and_target_lengths({input_length}, {noise_density}, "
                f"{mean_noise_span_length}) -> targets_length={expected_target}"
            )
        _, spans = _num_noise_tokens_and_spans(raw_length, noise_density, mean_noise_span_length)
        if len(sentinel_ids) < spans:
            raise ValueError(
                f"input_length={input_length} needs {spans} sentinel tokens per example but "
                f"only {len(sentinel_ids)} sentinel_ids were given; lower input_length or "
                "pass more <extra_id_N> ids"
            )
        if len(set(sentinel_ids)) != len(sentinel_ids) or eos_id in sentinel_ids:
            raise ValueError("sentinel_ids must be distinct and must not contain eos_id")
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.input_length = input_length
        self.target_length = target_length
        self.raw_length = raw_length
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [as_token_list(ex["input_ids"]) for ex in examples]
        bad = [len(r) for r in rows if len(r) != self.raw_length]
        if bad:
            raise ValueError(
                f"span corruption expects packed chunks of exactly {self.raw_length} tokens "
                f"(pack_documents(docs, chunk_length={self.raw_length}, eos_id)); got length "
                f"{bad[0]}"
            )
        input_ids = np.asarray(rows, dtype=np.int64).reshape(len(rows), self.raw_length)
        rng = self._next_rng()
        mask_indices = np.asarray(
            [
                random_spans_noise_mask(
                    self.raw_length, self.noise_density, self.mean_noise_span_length, rng
                )
                for _ in rows
            ]
        ).reshape(len(rows), self.raw_length)
        inputs = self._filter_input_ids(input_ids, mask_indices)
        labels = self._filter_input_ids(input_ids, ~mask_indices)
        if inputs.shape[-1] != self.input_length or labels.shape[-1] != self.target_length:
            raise AssertionError(  # unreachable when the lengths were computed as above
                f"corrupted lengths {inputs.shape[-1]}/{labels.shape[-1]} != "
                f"{self.input_length}/{self.target_length}"
            )
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.ones(inputs.shape, dtype=torch.long),
            "labels": torch.from_numpy(labels),
        }

    def _filter_input_ids(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Replace each masked span by the next sentinel, delete the rest of it, append EOS.

        Same arithmetic as HF's `create_sentinel_ids` + `filter_input_ids`, but sentinels are
        looked up in `sentinel_ids` instead of assuming `vocab_size - k`, and deleted positions
        are marked -1 so a real token id 0 would survive.
        """
        mask = mask.astype(np.int8)
        start_indices = mask - np.roll(mask, 1, axis=-1) * mask
        start_indices[:, 0] = mask[:, 0]
        span_number = np.cumsum(start_indices, axis=-1)  # 1-based span index at each position
        sentinels = self.sentinel_ids[np.maximum(span_number - 1, 0)]
        full = np.where(start_indices != 0, sentinels, input_ids)
        full = np.where(mask - start_indices != 0, -1, full)
        batch_size = input_ids.shape[0]
        kept = full[full >= 0].reshape((batch_size, -1))
        eos = np.full((batch_size, 1), self.eos_id, dtype=np.int64)
        return np.concatenate([kept, eos], axis=-1)


# --------------------------------------------------------------------------------------------
# BART / mBART denoising
# --------------------------------------------------------------------------------------------


def permute_sentences(
    tokens: Sequence[int], boundary_ids: Collection[int], rng: np.random.Generator
) -> list[int]:
    """Shuffle the order of sentences; a sentence ends after any id in `boundary_ids`.

    A trailing fragment without a boundary is a sentence too; with no boundary at all the
    tokens come back unchanged (one sentence).
    """
    tokens = as_token_list(tokens)
    ends = [i + 1 for i, t in enumerate(tokens) if t in boundary_ids]
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    if len(ends) == 1:
        return tokens
    starts = [0, *ends[:-1]]
    order = rng.permutation(len(ends))
    return [t for k in order for t in tokens[starts[k] : ends[k]]]


def infill_spans(
    tokens: Sequence[int],
    mask_id: int,
    mask_ratio: float,
    poisson_lambda: float,
    rng: np.random.Generator,
) -> list[int]:
    """BART text infilling: replace random spans by one `mask_id` each.

    As fairseq's `DenoisingDataset.add_whole_word_mask` with `mask_length=span-poisson` and
    `replace_length=1`: `ceil(len * mask_ratio)` tokens are masked, span lengths are drawn
    from Poisson(`poisson_lambda`) until they cover that budget, the last one is trimmed to
    fit, and 0-length spans become inserted masks. Two differences, both deliberate: spans are
    placed without overlapping (fairseq lets random starts overlap, so it masks less than its
    budget), and masking is per token, since silver has no word-boundary information.
    """
    tokens = as_token_list(tokens)
    n = len(tokens)
    num_to_mask = min(math.ceil(n * mask_ratio), n)
    if num_to_mask == 0:
        return tokens
    lengths = rng.poisson(poisson_lambda, size=num_to_mask)
    cum_length = np.cumsum(lengths)
    while cum_length[-1] < num_to_mask:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=num_to_mask)])
        cum_length = np.cumsum(lengths)
    # Trim to the masking budget.
    last = int(np.argmax(cum_length >= num_to_mask))
    lengths = lengths[: last + 1].copy()
    lengths[last] = num_to_mask - (cum_length[last - 1] if last > 0 else 0)
    # Each span (0-length ones included) goes into one of the n - num_to_mask + 1 gaps around
    # the kept tokens; spans in the same gap sit side by side.
    gaps = np.sort(rng.integers(0, n - num_to_mask + 1, size=len(lengths)))
    out: list[int] = []
    pos = kept = 0
    for gap, length in zip(gaps.tolist(), lengths.tolist(), strict=True):
        while kept < gap:
            out.append(tokens[pos])
            pos += 1
            kept += 1
        out.append(mask_id)
        pos += length
    out.extend(tokens[pos:])
    return out


class DenoisingCollator(SeededCollator):
    """BART/mBART denoising: sentence permutation, then text infilling, over packed chunks.

    Format (mBART-cc25 pretraining, `X </s> <lang>`):
        input_ids = noise(X) + [eos] + [lang]
        labels    = X        + [eos] + [lang]
    With `lang_id=None` (BART) the language code is left out. A chunk that already ends with
    EOS does not get a second one.

    Decoder start: no `decoder_input_ids` are returned. `MBartForConditionalGeneration`
    builds them from the labels with its own `shift_tokens_right`, which moves the last
    non-pad label (the language code) to the front: `<lang> X </s>`, exactly the mBART
    pretraining decoder input, whatever `config.decoder_start_token_id` says. This relies on
    right padding, which this collator always uses. For BART (`lang_id=None`) the model
    starts from `config.decoder_start_token_id`.

    Batches are padded to the longest row: `input_ids` with `pad_id` (masking shortens rows by
    different amounts), `attention_mask` 0 there, `labels` with -100.

    Args:
        mask_id: the tokenizer's `<mask>` id.
        eos_id: the tokenizer's EOS (`</s>`) id; also a sentence boundary.
        pad_id: the tokenizer's pad id.
        lang_id: id of the language code (e.g. `en_XX`), or None for BART.
        sentence_end_ids: ids that end a sentence (the pieces for ".", "!", "?", ...).
        mask_ratio: fraction of tokens masked (mBART: 0.35).
        poisson_lambda: mean span length (mBART: 3.5).
        permute_sentences: shuffle sentence order before masking.
        seed: base seed for the per-batch generators.
        rank, world_size: this process in data-parallel training (part of each batch's seed).
    """

    def __init__(
        self,
        mask_id: int,
        eos_id: int,
        pad_id: int,
        lang_id: int | None,
        sentence_end_ids: Collection[int] = (),
        mask_ratio: float = 0.35,
        poisson_lambda: float = 3.5,
        permute_sentences: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(seed, rank, world_size)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be > 0, got {poisson_lambda}")
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.lang_id = lang_id
        self.sentence_end_ids = frozenset(sentence_end_ids) | {eos_id}
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda
        self.permute_sentences = permute_sentences
        self._suffix = [eos_id] if lang_id is None else [eos_id, lang_id]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rng = self._next_rng()
        sources: list[list[int]] = []
        targets: list[list[int]] = []
        for ex in examples:
            tokens = as_token_list(ex["input_ids"])
            if tokens and tokens[-1] == self.eos_id:
                tokens = tokens[:-1]
            noised = tokens
            if self.permute_sentences:
                noised = permute_sentences(noised, self.sentence_end_ids, rng)
            noised = infill_spans(noised, self.mask_id, self.mask_ratio, self.poisson_lambda, rng)
            sources.append(noised + self._suffix)
            targets.append(tokens + self._suffix)
        input_ids = pad_rows(sources, self.pad_id)
        attention_mask = pad_rows([[1] * len(s) for s in sources], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad_rows(targets, LABEL_PAD_ID),
        }
