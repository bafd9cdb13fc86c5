"""Scoring a model on held-out rows: one function for base model, candidate and champion.

The numbers that decide the champion must come from the same code for both sides, so every
model is scored here, on an `EvalSet`:

- `eval_loss`: the mean loss over the eval batches, as Trainer's evaluation computes it, on the
  eval collator's fixed noise: the base model's value is the starting point of training's
  eval-loss curve, and the candidate's equals the last point of it.
- supervised: `eval_bleu` and `eval_chrf` (sacrebleu, through training's `SacreBleu`) of greedy
  (or `train.num_beams`) generations against the references.
- span corruption and denoising: `eval_span_exact`, the share of masked spans the model restores
  token for token. T5: each sentinel's span in the output equals the label's. mBART: spans of
  each held-out chunk are replaced by `<mask>` (fixed seed), and a span counts as restored when
  the reconstruction holds it between the tokens that surrounded it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tasks.tracking.eval_set import EvalSet
from tasks.train.model import load_model
from tasks.train.objectives import sentinel_ids
from tasks.train.packing import LABEL_PAD_ID
from tasks.train.trainer import SacreBleu

SAMPLE_ROWS = 5  # held-out rows shown as generation samples (MLflow table, Prefect artifact)
SPAN_SEED = 20240611  # the denoising metric's masks: fixed, so every model gets the same inputs


@dataclass(frozen=True)
class ModelScores:
    """A model's metrics on an eval set, and what it generated for the sample rows."""

    metrics: dict[str, float]
    samples: tuple[str, ...]


@dataclass(frozen=True)
class SampleRows:
    """The inputs and references of the sample rows, as text."""

    inputs: tuple[str, ...]
    references: tuple[str, ...]


def evaluate_model(
    model: str | Path, eval_set: EvalSet, *, revision: str | None = None
) -> ModelScores:
    """Score the seq2seq model `model` (a folder or hub id) on `eval_set`."""
    import torch

    net = load_model(str(model), revision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    if len(eval_set) == 0:
        return ModelScores({}, ())
    metrics = {"eval_loss": _eval_loss(net, eval_set, device)}
    if eval_set.objective == "span_corruption":
        exact, samples = _t5_span_exact(net, eval_set, device)
        metrics["eval_span_exact"] = exact
    elif eval_set.objective == "denoising":
        exact, samples = _restored_spans(net, eval_set, device)
        metrics["eval_span_exact"] = exact
    else:
        bleu, samples = _bleu_chrf(net, eval_set, device)
        metrics.update(bleu)
    return ModelScores(metrics, tuple(samples[:SAMPLE_ROWS]))


def sample_rows(eval_set: EvalSet) -> SampleRows:
    """The model inputs and references of the first `SAMPLE_ROWS` held-out examples."""
    inputs, references = [], []
    for batch in _batches(eval_set, limit=SAMPLE_ROWS):
        if eval_set.objective == "denoising":
            batch, _ = _masked_batch(eval_set, batch)
        inputs += [readable(eval_set.tokenizer, row) for row in batch["input_ids"].tolist()]
        references += [readable(eval_set.tokenizer, row) for row in batch["labels"].tolist()]
    return SampleRows(tuple(inputs[:SAMPLE_ROWS]), tuple(references[:SAMPLE_ROWS]))


def readable(tokenizer, ids: list[int]) -> str:
    """Text of token ids without pad, EOS or language codes; T5 sentinels and `<mask>` stay."""
    keep = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<extra_id_")}
    if tokenizer.mask_token_id is not None:
        keep.add(tokenizer.mask_token_id)
    drop = set(tokenizer.all_special_ids) - keep
    text = tokenizer.decode([i for i in ids if i >= 0 and i not in drop])
    return text.strip()


def _batches(eval_set: EvalSet, limit: int | None = None):
    """Collated eval batches in order, with the collator's noise restarted (as Trainer does)."""
    if hasattr(eval_set.collator, "set_epoch"):
        eval_set.collator.set_epoch(0)
    n = len(eval_set) if limit is None else min(limit, len(eval_set))
    for start in range(0, n, eval_set.batch_size):
        rows = [eval_set.examples[i] for i in range(start, min(start + eval_set.batch_size, n))]
        yield eval_set.collator(rows)


def _eval_loss(net, eval_set: EvalSet, device: str) -> float:
    """The mean of the batches' mean losses: what Trainer's evaluation reports (it repeats each
    batch's loss by the eval batch size, a short last batch included)."""
    import torch

    losses = []
    with torch.inference_mode():
        for batch in _batches(eval_set):
            batch = {k: v.to(device) for k, v in batch.items()}
            losses.append(float(net(**batch).loss))
    return sum(losses) / len(losses) if losses else math.nan


def _generate(net, eval_set: EvalSet, batch, device: str) -> list[list[int]]:
    import torch

    kwargs = {"max_length": eval_set.max_length, "num_beams": eval_set.num_beams}
    if eval_set.decoder_start_id is not None:
        kwargs["decoder_start_token_id"] = eval_set.decoder_start_id
    with torch.inference_mode():
        out = net.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            **kwargs,
        )
    return out.tolist()


def _bleu_chrf(net, eval_set: EvalSet, device: str) -> tuple[dict[str, float], list[str]]:
    """BLEU and chrF of the generations, computed by training's own `SacreBleu`."""
    tok = eval_set.tokenizer
    preds: list[list[int]] = []
    labels: list[list[int]] = []
    for batch in _batches(eval_set):
        preds += _generate(net, eval_set, batch, device)
        labels += batch["labels"].tolist()
    scores = SacreBleu(tok)(
        SimpleNamespace(
            predictions=_padded(preds, tok.pad_token_id), label_ids=_padded(labels, LABEL_PAD_ID)
        )
    )
    return {f"eval_{k}": float(v) for k, v in scores.items()}, [readable(tok, p) for p in preds]


def _padded(rows: list[list[int]], value: int) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    return np.asarray([r + [value] * (width - len(r)) for r in rows], dtype=np.int64)


def _t5_span_exact(net, eval_set: EvalSet, device: str) -> tuple[float, list[str]]:
    """Share of label spans (`<extra_id_k> tokens`) that the output gives exactly."""
    tok = eval_set.tokenizer
    sentinels = set(sentinel_ids(tok))
    stop = {tok.eos_token_id, tok.pad_token_id, LABEL_PAD_ID}
    hit = total = 0
    texts: list[str] = []
    for batch in _batches(eval_set):
        outputs = _generate(net, eval_set, batch, device)
        for out, label in zip(outputs, batch["labels"].tolist(), strict=True):
            restored, spans = t5_spans_restored(out, label, sentinels, stop)
            hit, total = hit + restored, total + spans
            texts.append(readable(tok, out))
    return (hit / total if total else 0.0), texts


def t5_spans_restored(
    output: list[int], label: list[int], sentinels: set[int], stop: set[int]
) -> tuple[int, int]:
    """(spans restored exactly, spans) of one T5 span-corruption example."""
    want = {k: v for k, v in _spans(label, sentinels, stop).items() if v}
    got = _spans(output, sentinels, stop)
    return sum(got.get(k) == v for k, v in want.items()), len(want)


def _spans(ids: list[int], sentinels: set[int], stop: set[int]) -> dict[int, tuple[int, ...]]:
    """{sentinel id: the tokens after it} for a T5 span-corruption target or output."""
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for i in ids:
        if i in sentinels:
            current = i
            spans.setdefault(i, [])
        elif i in stop:
            if spans:  # the leading decoder-start pad is not the end
                break
        elif current is not None:
            spans[current].append(i)
    return {k: tuple(v) for k, v in spans.items()}


def _masked_batch(eval_set: EvalSet, batch):
    """The chunks of a denoising batch with spans replaced by `<mask>`, and those spans."""
    import torch

    tok = eval_set.tokenizer
    suffix = [tok.eos_token_id] + (
        [eval_set.decoder_start_id] if eval_set.decoder_start_id is not None else []
    )
    specials = set(tok.all_special_ids)
    sources, targets, spans = [], [], []
    for label in batch["labels"].tolist():
        tokens = [i for i in label if i >= 0 and i not in specials]
        rng = np.random.default_rng([SPAN_SEED, len(spans)])
        masked, cut = mask_spans(
            tokens,
            tok.mask_token_id,
            mask_ratio=eval_set.mask_ratio,
            mean_span=eval_set.mean_span,
            rng=rng,
        )
        sources.append(masked + suffix)
        targets.append(tokens + suffix)
        spans.append(cut)
    width = max(len(s) for s in sources)
    pad = tok.pad_token_id
    out = {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sources]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources]),
        "labels": torch.tensor(
            [t + [LABEL_PAD_ID] * (max(map(len, targets)) - len(t)) for t in targets]
        ),
    }
    return out, spans


def mask_spans(
    tokens: list[int], mask_id: int, *, mask_ratio: float, mean_span: float, rng
) -> tuple[list[int], list]:
    """Replace about `mask_ratio` of `tokens` by spans of ~`mean_span` tokens, one per segment.

    Returns the masked tokens and, per span, (token before, span, token after or None).
    """
    span = max(1, round(mean_span))
    count = max(1, round(len(tokens) * mask_ratio / span))
    segment = len(tokens) // count
    if segment < span + 1:
        return list(tokens), []
    out, cut, pos = [], [], 0
    for k in range(count):
        begin = k * segment + 1 + int(rng.integers(0, segment - span))  # a kept token before
        out += tokens[pos:begin] + [mask_id]
        after = tokens[begin + span] if begin + span < len(tokens) else None
        cut.append((tokens[begin - 1], tuple(tokens[begin : begin + span]), after))
        pos = begin + span
    return out + tokens[pos:], cut


def _restored_spans(net, eval_set: EvalSet, device: str) -> tuple[float, list[str]]:
    """Share of masked spans that the reconstruction holds, between their neighbours."""
    hit = total = 0
    texts: list[str] = []
    for batch in _batches(eval_set):
        masked, spans = _masked_batch(eval_set, batch)
        for out, cut in zip(_generate(net, eval_set, masked, device), spans, strict=True):
            hit += denoised_spans_restored(out, cut)
            total += len(cut)
            texts.append(readable(eval_set.tokenizer, out))
    return (hit / total if total else 0.0), texts


def denoised_spans_restored(output: list[int], spans: list) -> int:
    """How many of `spans` ((token before, span, token after or None)) `output` holds."""
    text = tuple(output)
    found = 0
    for before, tokens, after in spans:
        needle = (before, *tokens) + ((after,) if after is not None else ())
        found += _contains(text, needle)
    return found


def _contains(haystack: tuple[int, ...], needle: tuple[int, ...]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))
