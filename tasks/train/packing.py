"""Packing and padding: how silver rows become dense batches, and how dense they are.

Packing concatenates documents into fixed-length chunks, so the pretraining objectives train on
batches without padding; supervised pairs cannot be packed (one pair is one example), so they are
padded per batch, and the supervised sampler (`tasks.train.objectives`) keeps that padding small.
`count_tokens` measures the result: the useful-tokens metrics and the benchmark count with it.

Noise (span corruption, denoising) is applied to the packed chunks by `tasks.train.noise`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

LABEL_PAD_ID = -100
"""Label value ignored by the cross-entropy loss of every Hugging Face seq2seq model."""


def as_token_list(tokens: Sequence[int] | np.ndarray) -> list[int]:
    """Token ids as a plain list (silver rows arrive as lists or numpy arrays)."""
    return tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]


def pad_rows(
    rows: Sequence[Sequence[int]], value: int, multiple: int | None = None
) -> torch.Tensor:
    """Right-pad rows with `value` to the longest one (rounded up to `multiple`)."""
    width = max((len(r) for r in rows), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pack_documents(
    docs: Iterable[Sequence[int]],
    chunk_length: int,
    eos_id: int,
    drop_ids: Collection[int] = (),
) -> Iterator[list[int]]:
    """Concatenate tokenized documents and cut the stream into chunks of `chunk_length`.

    Each document ends with exactly one EOS in the stream: one is appended when missing and
    repeated trailing EOS tokens collapse into one. Empty documents are skipped. The final
    partial chunk is dropped, as in `run_t5_mlm_flax.py`'s `group_texts`. Only one chunk plus
    one document is held in memory, so `docs` can be a lazy iterator over a large table.

    Args:
        docs: token id sequences (lists or numpy arrays), e.g. silver `input_ids`.
        chunk_length: tokens per chunk; for span corruption the raw length from
            `compute_t5_input_and_target_lengths`.
        eos_id: the tokenizer's EOS id.
        drop_ids: ids removed from documents before packing, e.g. the language code an mBART
            tokenizer appends after EOS (the denoising collator adds it back once per chunk).

    Yields:
        Lists of exactly `chunk_length` token ids.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of tokens, got {chunk_length}")
    drop = frozenset(drop_ids)
    buffer: list[int] = []
    for doc in docs:
        tokens = as_token_list(doc)
        if drop:
            tokens = [t for t in tokens if t not in drop]
        while tokens and tokens[-1] == eos_id:
            tokens.pop()
        if not tokens:
            continue
        buffer.extend(tokens)
        buffer.append(eos_id)
        start = 0
        while len(buffer) - start >= chunk_length:
            yield buffer[start : start + chunk_length]
            start += chunk_length
        del buffer[:start]


class SupervisedCollator:
    """Dynamic padding for source/target pairs (what `DataCollatorForSeq2Seq` does, minus the
    tokenizer): `input_ids` padded with `pad_id`, `labels` with -100, right side.

    Pair it with the supervised sampler (`tasks.train.objectives.PairLengthSampler`) so batches
    hold similar lengths. The model derives `decoder_input_ids` from the labels.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        sources = [as_token_list(ex["input_ids"]) for ex in examples]
        targets = [as_token_list(ex["labels"]) for ex in examples]
        multiple = self.pad_to_multiple_of
        return {
            "input_ids": pad_rows(sources, self.pad_id, multiple),
            "attention_mask": pad_rows([[1] * len(s) for s in sources], 0, multiple),
            "labels": pad_rows(targets, LABEL_PAD_ID, multiple),
        }


def count_tokens(batch: Mapping[str, Any], pad_id: int | None = None) -> dict[str, int]:
    """Real (non-padding) tokens and total slots in a batch's `input_ids` and `labels`.

    Input tokens are those `!= pad_id` (or, without `pad_id`, where `attention_mask` is 1);
    label tokens are those `!= -100` and `!= pad_id`.

    Returns:
        `input_tokens`, `label_tokens`, `tokens` (their sum), `slots` (all positions).
    """
    input_ids = torch.as_tensor(batch["input_ids"])
    if pad_id is not None:
        input_real = input_ids != pad_id
    elif "attention_mask" in batch:
        input_real = torch.as_tensor(batch["attention_mask"]) != 0
    else:
        input_real = torch.ones_like(input_ids, dtype=torch.bool)
    input_tokens = int(input_real.sum())
    label_tokens = 0
    slots = input_ids.numel()
    if batch.get("labels") is not None:
        labels = torch.as_tensor(batch["labels"])
        label_real = labels != LABEL_PAD_ID
        if pad_id is not None:
            label_real &= labels != pad_id
        label_tokens = int(label_real.sum())
        slots += labels.numel()
    return {
        "input_tokens": input_tokens,
        "label_tokens": label_tokens,
        "tokens": input_tokens + label_tokens,
        "slots": slots,
    }
