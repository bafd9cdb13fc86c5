"""BLEU and chrF of supervised evaluation (tasks.train.trainer.SacreBleu) against values computed
here with sacrebleu on the texts themselves, through the token ids and paddings the Trainer hands
over (labels padded with -100, generations with the pad id or -100 across batches)."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

REFS = ["Le chat dort sur le canapé.", "The weather in Paris is nice today.", "Guten Morgen!"]


def padded(rows: list[list[int]], width: int, pad: int) -> np.ndarray:
    return np.array([row + [pad] * (width - len(row)) for row in rows])


def score(tok, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """SacreBleu on generations and labels shaped as Seq2SeqTrainer's evaluation passes them."""
    from transformers import EvalPrediction

    from tasks.train.trainer import SacreBleu

    hyp_ids, ref_ids = tok(hyps)["input_ids"], tok(refs)["input_ids"]
    width = max(map(len, hyp_ids + ref_ids)) + 3
    preds = padded(hyp_ids, width, tok.pad_token_id)
    preds[0, -1] = -100  # the Trainer pads generations of different batches with -100
    labels = padded(ref_ids, width, -100)
    return SacreBleu(tok)(EvalPrediction(predictions=preds, label_ids=labels))


def test_generations_equal_to_the_references_score_100(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["t5"])
    assert score(tok, REFS, REFS) == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}


def test_scores_are_sacrebleu_of_the_decoded_texts(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["t5"])
    hyps = ["Le chat dort sur la table.", "The weather in Paris is bad.", "Guten Abend!"]
    # What the texts read after the tokenizer (it may normalise), scored by sacrebleu directly.
    text = [tok.decode(tok(h)["input_ids"], skip_special_tokens=True).strip() for h in hyps]
    ref = [tok.decode(tok(r)["input_ids"], skip_special_tokens=True).strip() for r in REFS]
    expected = {
        "bleu": sacrebleu.corpus_bleu(text, [ref]).score,
        "chrf": sacrebleu.corpus_chrf(text, [ref]).score,
    }
    got = score(tok, hyps, REFS)
    assert got == {k: pytest.approx(v) for k, v in expected.items()}
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
