"""The champion rule and the held-out metrics' arithmetic, without a model or a server."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.tracking.evaluation import denoised_spans_restored, mask_spans, t5_spans_restored
from tasks.tracking.lineage import EvalSetIdentity, eval_set_identity
from tasks.tracking.promotion import CandidateEvaluation, decide, not_comparable


def rule(candidate, champion, greater=False, delta=0.01):
    return decide(
        metric="m",
        greater_is_better=greater,
        min_delta=delta,
        candidate=candidate,
        champion=champion,
        champion_version="3",
    )


@pytest.mark.parametrize(
    ("candidate", "champion", "greater", "outcome"),
    [
        (1.50, 2.00, False, "promoted"),  # lower loss by 0.5
        (2.00, 2.00, False, "kept"),  # a tie keeps the champion
        (1.995, 2.00, False, "kept"),  # better, but not by more than min_delta
        (2.50, 2.00, False, "kept"),  # worse
        (2.50, 2.00, True, "promoted"),  # higher is better (chrF, BLEU)
        (None, 2.00, False, "kept"),  # no score on its held-out rows
    ],
)
def test_candidate_must_beat_the_champion_by_more_than_min_delta(
    candidate, champion, greater, outcome
):
    decision = rule(candidate, champion, greater)
    assert decision.outcome == outcome
    assert decision.promote == (outcome == "promoted")
    if candidate is not None:
        assert "same held-out rows" in decision.reason and "v3" in decision.reason


def test_tie_reason_says_tie_and_worse_says_worse():
    assert rule(2.0, 2.0).reason.startswith("a tie")
    assert rule(2.5, 2.0).reason.startswith("worse")
    assert rule(1.0, 2.0).reason.startswith("better")
    assert rule(2.0, 2.0, delta=0.0).outcome == "kept"  # even with no margin


def test_other_tokenizer_or_objective_is_not_comparable():
    mine = {"objective": "supervised", "tokenizer_fingerprint": "abc"}
    assert not_comparable(mine, dict(mine)) is None
    assert "tokenizer_fingerprint" in not_comparable(mine, {**mine, "tokenizer_fingerprint": "x"})
    assert "objective" in not_comparable(mine, {**mine, "objective": "denoising"})
    assert "records no" in not_comparable(mine, {"objective": "supervised"})


def test_evaluation_round_trips_through_run_tags_exactly():
    identity = eval_set_identity("/lake/silver/t", 7, ["r2", "r1"])
    assert identity == eval_set_identity("/lake/silver/t", 7, ["r1", "r2"])  # order-free
    assert identity.rows == 2 and identity.version == "7"
    ev = CandidateEvaluation(identity, {"eval_loss": 2.0 / 3}, {"eval_chrf": 91.25}, ("a b",), "x")
    back = CandidateEvaluation.from_run_tags(ev.run_tags())
    assert back == ev
    assert EvalSetIdentity.from_tags({}) is None


def test_t5_span_exact_counts_spans_restored_token_for_token():
    s0, s1, eos, pad = 99, 98, 1, 0
    label = [s0, 5, 6, s1, 7, eos]
    assert t5_spans_restored([pad, s0, 5, 6, s1, 7, eos], label, {s0, s1}, {eos, pad}) == (2, 2)
    assert t5_spans_restored([pad, s0, 5, 6, s1, 8, eos], label, {s0, s1}, {eos, pad}) == (1, 2)
    assert t5_spans_restored([pad, s1, 5, 6, eos], label, {s0, s1}, {eos, pad}) == (0, 2)
    # A trailing sentinel with nothing after it is not a masked span.
    assert t5_spans_restored([pad, s0, 5, eos], [s0, 5, s1, eos], {s0, s1}, {eos, pad}) == (1, 1)


def test_denoising_span_metric_finds_spans_between_their_neighbours():
    tokens = list(range(10, 50))
    masked, spans = mask_spans(
        tokens, 3, mask_ratio=0.35, mean_span=3.5, rng=np.random.default_rng(0)
    )
    assert spans and masked.count(3) == len(spans) and len(masked) < len(tokens)
    assert denoised_spans_restored([2] + tokens + [2], spans) == len(spans)  # perfect
    assert denoised_spans_restored(masked, spans) == 0  # copies its input: restores nothing
    wrong = [t if t != spans[0][1][0] else 7 for t in tokens]
    assert denoised_spans_restored(wrong, spans) == len(spans) - 1
