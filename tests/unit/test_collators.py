"""Unit tests for the collators (tasks.train.packing, tasks.train.noise) on synthetic token ids
(vocab 1000, eos 1, pad 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.train.noise import (
    DenoisingCollator,
    SpanCorruptionCollator,
    compute_t5_input_and_target_lengths,
    infill_spans,
    permute_sentences,
    random_spans_noise_mask,
)
from tasks.train.packing import LABEL_PAD_ID, SupervisedCollator, count_tokens, pack_documents

PAD, EOS, MASK, LANG = 0, 1, 3, 850
# As in T5 vocabularies: <extra_id_0> has the highest id.
SENTINELS = list(range(999, 899, -1))
TEXT_IDS = (10, 800)  # ordinary tokens live in [10, 800)


def _chunks(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(*TEXT_IDS, size=length).tolist()} for _ in range(n)]


def _span_collator(input_length: int, **kwargs) -> SpanCorruptionCollator:
    _, target_length = compute_t5_input_and_target_lengths(input_length)
    return SpanCorruptionCollator(SENTINELS, EOS, PAD, input_length, target_length, **kwargs)


def nonpad_fraction(batch, pad_id: int) -> float:
    """Share of the batch's input and label positions that hold real tokens."""
    counts = count_tokens(batch, pad_id)
    return counts["tokens"] / counts["slots"]


def _merge(inputs: list[int], labels: list[int]) -> list[int]:
    """Undo span corruption: put each label span back in place of its sentinel in the inputs."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in labels[:-1]:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


# ------------------------------------------------------------------------------------ lengths


def test_lengths_match_hf_example():
    assert compute_t5_input_and_target_lengths(512) == (568, 114)
    # 766 raw -> 383 noise in 128 spans: inputs 383 + 128 + 1 = 512, targets the same.
    assert compute_t5_input_and_target_lengths(512, 0.5, 3.0) == (766, 512)


@pytest.mark.parametrize("input_length", [32, 64, 128, 512])
def test_span_corruption_shapes_are_exact_without_padding(input_length):
    raw, target = compute_t5_input_and_target_lengths(input_length)
    collator = _span_collator(input_length)
    assert collator.raw_length == raw
    batch = collator(_chunks(4, raw))
    assert batch["input_ids"].shape == (4, input_length)
    assert batch["labels"].shape == (4, target)
    assert batch["attention_mask"].shape == (4, input_length)
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].dtype == torch.long
    assert bool((batch["attention_mask"] == 1).all())
    assert not bool((batch["input_ids"] == PAD).any())
    assert not bool((batch["labels"] == PAD).any()) and not bool((batch["labels"] < 0).any())


def test_inconsistent_target_length_and_wrong_chunk_length_are_refused():
    with pytest.raises(ValueError, match="target_length"):
        SpanCorruptionCollator(SENTINELS, EOS, PAD, 512, 100)
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruptionCollator(SENTINELS[:5], EOS, PAD, 512, 114)
    with pytest.raises(ValueError, match="568"):
        _span_collator(512)(_chunks(2, 512))


# ---------------------------------------------------------------------------- span corruption


@pytest.mark.parametrize("input_length", [32, 128, 512])
def test_span_corruption_round_trips_with_ordered_sentinels(input_length):
    collator = _span_collator(input_length, seed=3)
    examples = _chunks(8, collator.raw_length, seed=input_length)
    batch = collator(examples)
    for ex, inputs, labels in zip(
        examples, batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True
    ):
        assert inputs[-1] == EOS and labels[-1] == EOS
        in_sentinels = [t for t in inputs if t in SENTINELS]
        label_sentinels = [t for t in labels if t in SENTINELS]
        assert in_sentinels == SENTINELS[: len(in_sentinels)]  # <extra_id_0>, <extra_id_1>, ...
        assert label_sentinels == in_sentinels
        assert labels[0] == SENTINELS[0]  # spans start with non-noise, so labels start with one
        assert _merge(inputs, labels) == ex["input_ids"]


def test_packed_chunks_with_eos_and_token_id_zero_survive():
    # Packed chunks contain document EOS tokens; an id 0 must not be mistaken for "deleted".
    collator = _span_collator(64)
    chunk = [0, *range(10, 10 + collator.raw_length - 2), EOS]
    batch = collator([{"input_ids": chunk}])
    assert _merge(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) == chunk


def test_noise_mask_density_and_span_structure():
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(200)])
    assert masks.sum(axis=1).tolist() == [85] * 200  # round(568 * 0.15), every time
    assert not masks[:, 0].any() and masks[:, -1].all()  # starts with non-noise, ends noise
    starts = masks[:, 1:] & ~masks[:, :-1]
    assert starts.sum(axis=1).tolist() == [28] * 200  # round(85 / 3) spans
    assert abs(masks.mean() - 0.15) < 0.005
    assert len({m.tobytes() for m in masks}) == 200


def test_span_corruption_is_deterministic_per_seed_and_epoch():
    examples = _chunks(4, _span_collator(128).raw_length)

    def run(seed: int, epoch: int) -> list[torch.Tensor]:
        collator = _span_collator(128, seed=seed)
        collator.set_epoch(epoch)
        return [collator(examples)["input_ids"] for _ in range(3)]

    first, again = run(0, 0), run(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # a new pattern for every batch
    assert not torch.equal(first[0], run(0, 1)[0])  # and for every epoch
    assert not torch.equal(first[0], run(1, 0)[0])  # and for every seed


def test_resume_reproduces_the_skipped_batches_noise():
    examples = _chunks(2, _span_collator(64).raw_length)
    full = _span_collator(64, seed=7)
    full.set_epoch(2)
    batches = [full(examples)["labels"] for _ in range(5)]
    resumed = _span_collator(64, seed=7)
    resumed.set_epoch(2, start_batch=3)
    assert torch.equal(resumed(examples)["labels"], batches[3])
    assert torch.equal(resumed(examples)["labels"], batches[4])


def test_each_rank_draws_its_own_noise_reproducibly():
    examples = _chunks(2, _span_collator(64).raw_length)
    alone = _span_collator(64, seed=3)
    draws = [alone(examples)["labels"] for _ in range(6)]
    ranks = [_span_collator(64, seed=3, rank=r, world_size=2) for r in range(2)]
    per_rank = [[c(examples)["labels"] for _ in range(3)] for c in ranks]
    # Two ranks given the same rows do not mask them alike.
    assert not torch.equal(per_rank[0][0], per_rank[1][0])
    # Batch n of rank r is global batch n * 2 + r: what one process draws there, no overlap.
    for r in range(2):
        for n in range(3):
            assert torch.equal(per_rank[r][n], draws[n * 2 + r])
    with pytest.raises(ValueError, match="rank must be in"):
        _span_collator(64, rank=2, world_size=2)


def test_noise_does_not_depend_on_dataloader_workers():
    collator = _span_collator(32, seed=5)
    data = _chunks(12, collator.raw_length)

    def batches(workers: int) -> list[torch.Tensor]:
        collator.set_epoch(0)  # what the training loop does at every epoch start
        loader = torch.utils.data.DataLoader(
            data, batch_size=2, collate_fn=collator, num_workers=workers
        )
        return [b["input_ids"] for b in loader]

    serial, parallel = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


# ------------------------------------------------------------------------------------ packing


def test_pack_documents_streams_exact_chunks_without_double_eos():
    docs = [[5, 6, 7, EOS], [8, 9], [], [EOS], [10, 11, 12, 13, EOS, EOS], np.array([14, 15])]
    joined = [5, 6, 7, EOS, 8, 9, EOS, 10, 11, 12, 13, EOS, 14, 15, EOS]
    chunks = list(pack_documents(iter(docs), 4, EOS))
    assert all(len(c) == 4 for c in chunks)
    flat = [t for c in chunks for t in c]
    assert flat == joined[: len(flat)] and len(flat) == 12  # remainder of 3 dropped
    assert all(not (a == b == EOS) for a, b in zip(flat, flat[1:], strict=False))


def test_pack_documents_is_lazy_and_can_drop_ids():
    def endless():
        while True:
            yield [20, 21, EOS, LANG]

    stream = pack_documents(endless(), 6, EOS, drop_ids={LANG})
    assert next(stream) == [20, 21, EOS, 20, 21, EOS]
    with pytest.raises(ValueError, match="chunk_length"):
        next(pack_documents([[1]], 0, EOS))


# ---------------------------------------------------------------------------------- denoising


def test_infill_spans_masks_35_percent_with_one_mask_per_span():
    rng = np.random.default_rng(0)
    tokens = list(range(100, 300))  # unique ids, so kept tokens identify what was masked
    masked_total = masks_total = 0
    for _ in range(300):
        out = infill_spans(tokens, MASK, 0.35, 3.5, rng)
        kept = [t for t in out if t != MASK]
        assert kept == [t for t in tokens if t in set(kept)]  # order preserved
        # Every run of removed tokens is marked by at least one mask at that place.
        i = 0
        for k, t in enumerate(out):
            if t == MASK:
                continue
            j = tokens.index(t)
            if j > i:
                assert k > 0 and out[k - 1] == MASK
            i = j + 1
        if i < len(tokens):
            assert out[-1] == MASK
        masked_total += len(tokens) - len(kept)
        masks_total += out.count(MASK)
    assert masked_total / (300 * len(tokens)) == pytest.approx(0.35, abs=0.01)
    # One mask per span: tokens per mask is about the mean span length (lambda = 3.5).
    assert masked_total / masks_total == pytest.approx(3.5, rel=0.1)


def test_permute_sentences_keeps_sentences_whole():
    rng = np.random.default_rng(1)
    tokens = [10, 11, 5, 12, 5, 13, 14, 15, 6, 16, 17]  # 5 and 6 end sentences
    sentences = {(10, 11, 5), (12, 5), (13, 14, 15, 6), (16, 17)}
    seen = set()
    for _ in range(50):
        out = permute_sentences(tokens, {5, 6}, rng)
        assert sorted(out) == sorted(tokens)
        parts, current = [], []
        for t in out:
            current.append(t)
            if t in (5, 6):
                parts.append(tuple(current))
                current = []
        # the unterminated tail may land mid-sequence and glue onto the next sentence
        assert set(parts) <= sentences | {(16, 17) + s for s in sentences}
        seen.add(tuple(out))
    assert len(seen) > 5
    assert permute_sentences([10, 11, 12], {5}, rng) == [10, 11, 12]


def test_denoising_batch_format_for_mbart():
    collator = DenoisingCollator(MASK, EOS, PAD, LANG, sentence_end_ids=[5], seed=0)
    examples = _chunks(6, 64) + [{"input_ids": list(range(10, 40))}]
    batch = collator(examples)
    inputs, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert inputs.shape == attention.shape and inputs.shape[0] == 7
    for ex, row, att, lab in zip(
        examples, inputs.tolist(), attention.tolist(), labels.tolist(), strict=True
    ):
        n = sum(att)
        assert att == [1] * n + [0] * (len(att) - n)
        assert row[n:] == [PAD] * (len(row) - n)
        assert row[n - 2 : n] == [EOS, LANG] and MASK in row[:n]
        target = ex["input_ids"] + [EOS, LANG]
        assert lab[: len(target)] == target
        assert lab[len(target) :] == [LABEL_PAD_ID] * (len(lab) - len(target))
    assert max(sum(a) for a in attention.tolist()) == inputs.shape[1]  # padded to the longest
    assert labels.shape[1] == 64 + 2


def test_denoising_decoder_starts_with_language_code():
    # The assumption documented on DenoisingCollator: MBart's own shift wraps the language code.
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    collator = DenoisingCollator(MASK, EOS, PAD, LANG)
    batch = collator([{"input_ids": list(range(10, 30))}, {"input_ids": list(range(10, 20))}])
    decoder_input_ids = shift_tokens_right(batch["labels"], PAD)
    assert decoder_input_ids[:, 0].tolist() == [LANG, LANG]
    assert decoder_input_ids[0, 1:].tolist() == [*range(10, 30), EOS]


def test_denoising_without_language_and_trailing_eos_is_not_doubled():
    collator = DenoisingCollator(MASK, EOS, PAD, None, permute_sentences=False, mask_ratio=0.0)
    batch = collator([{"input_ids": [10, 11, 12, EOS]}])
    assert batch["input_ids"].tolist() == [[10, 11, 12, EOS]]
    assert batch["labels"].tolist() == [[10, 11, 12, EOS]]


def test_denoising_is_deterministic_and_changes_per_epoch():
    examples = _chunks(3, 50)

    def first_batch(epoch: int) -> torch.Tensor:
        collator = DenoisingCollator(MASK, EOS, PAD, LANG, sentence_end_ids=[11, 12], seed=4)
        collator.set_epoch(epoch)
        return collator(examples)["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


# --------------------------------------------------------------------------------- supervised


def test_supervised_collator_pads_inputs_and_labels():
    examples = [
        {"input_ids": [5, 6, 7, EOS], "labels": [8, EOS]},
        {"input_ids": [5, EOS], "labels": [9, 10, 11, EOS]},
    ]
    batch = SupervisedCollator(PAD)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS], [5, EOS, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, EOS, -100, -100], [9, 10, 11, EOS]]

    padded = SupervisedCollator(PAD, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (2, 8) and padded["labels"].shape == (2, 8)
    assert padded["attention_mask"].sum().item() == 6
    assert (padded["labels"][:, 4:] == LABEL_PAD_ID).all()


# ------------------------------------------------------------------------------------ metrics


def test_token_counts_ignore_padding():
    batch = SupervisedCollator(PAD)(
        [
            {"input_ids": [5, 6, 7, EOS], "labels": [8, EOS]},
            {"input_ids": [5, EOS], "labels": [9, 10, 11, EOS]},
        ]
    )
    counts = count_tokens(batch, PAD)
    assert counts == {"input_tokens": 6, "label_tokens": 6, "tokens": 12, "slots": 16}
    assert count_tokens(batch)["input_tokens"] == 6  # from attention_mask
    assert nonpad_fraction(batch, PAD) == pytest.approx(12 / 16)
    span = _span_collator(32)(_chunks(2, _span_collator(32).raw_length))
    assert nonpad_fraction(span, PAD) == 1.0
