"""When a new version becomes `champion`, and the record that says why.

The rule (README, "MLflow"): the candidate and the current champion are scored by the same code
on the candidate's held-out rows (tasks/tracking/evaluation.py); the candidate takes the alias
only when it beats the champion on `tracking.champion_metric` by more than
`tracking.champion_min_delta` (a tie keeps the champion). Versions trained with another
tokenizer or objective are not compared (their losses are not on one scale, their inputs not
the same task): the alias stays, and the version says "not comparable". The first version of
a registered model is champion because there is no other.

The decision, its reason, the eval set's identity and the base, candidate and champion numbers
go on the version as tags, and a short model card into its description.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from tasks.tracking.lineage import EvalSetIdentity

Outcome = Literal["first", "promoted", "kept", "not_comparable"]
# Version tags that must agree for two versions to be compared.
COMPARED_ON = ("objective", "tokenizer_fingerprint")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate takes `champion`, and the reason in words."""

    outcome: Outcome
    reason: str

    @property
    def promote(self) -> bool:
        return self.outcome in ("first", "promoted")


@dataclass(frozen=True)
class CandidateEvaluation:
    """The base model's and the candidate's scores on the candidate's held-out rows.

    `examples` are held-out model inputs (the pyfunc model's input example: what the model was
    trained to take), `lang_code` the mBART source language code of the data.
    """

    eval_set: EvalSetIdentity | None
    base: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    examples: tuple[str, ...] = ()
    lang_code: str | None = None

    def run_tags(self) -> dict[str, str]:
        """The evaluation as run tags (exact values, read back by `from_run_tags`)."""
        if self.eval_set is None:
            return {}
        tags = dict(self.eval_set.tags())
        tags.update({f"eval.base.{k}": repr(v) for k, v in self.base.items()})
        tags.update({f"eval.candidate.{k}": repr(v) for k, v in self.candidate.items()})
        tags["eval.examples"] = json.dumps([e[:500] for e in self.examples[:2]])
        if self.lang_code:
            tags["eval.lang_code"] = self.lang_code
        return tags

    @classmethod
    def from_run_tags(cls, tags: Mapping[str, str]) -> CandidateEvaluation | None:
        identity = EvalSetIdentity.from_tags(dict(tags))
        if identity is None:
            return None
        return cls(
            identity,
            _scores(tags, "eval.base."),
            _scores(tags, "eval.candidate."),
            tuple(json.loads(tags.get("eval.examples") or "[]")),
            tags.get("eval.lang_code"),
        )


@dataclass(frozen=True)
class PromotionReport:
    """Base, candidate and champion numbers on one eval set, and the decision."""

    metric: str
    decision: Decision
    evaluation: CandidateEvaluation
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None

    def version_tags(self) -> dict[str, str]:
        tags = self.evaluation.run_tags()
        tags.update({f"eval.champion.{k}": repr(v) for k, v in self.champion.items()})
        if self.champion_version:
            tags["eval.champion.version"] = self.champion_version
        tags.update(
            {
                "promotion.metric": self.metric,
                "promotion.decision": self.decision.outcome,
                "promotion.reason": self.decision.reason,
            }
        )
        return tags


@dataclass(frozen=True)
class Registration:
    """The registered version and how the comparison with the champion went."""

    name: str
    version: str
    report: PromotionReport


def _scores(tags: Mapping[str, str], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in tags.items() if k.startswith(prefix)}


def not_comparable(candidate: Mapping[str, str], champion: Mapping[str, str]) -> str | None:
    """Why the versions with these tags cannot be compared, or None when they can."""
    for key in COMPARED_ON:
        mine, theirs = candidate.get(key), champion.get(key)
        if not mine or not theirs:
            return f"the champion or this version records no {key}"
        if mine != theirs:
            return f"{key} differs ({mine} here, {theirs} for the champion)"
    return None


def decide(
    *,
    metric: str,
    greater_is_better: bool,
    min_delta: float,
    candidate: float | None,
    champion: float | None,
    champion_version: str,
) -> Decision:
    """The candidate wins when it beats the champion by more than `min_delta` on `metric`."""
    if candidate is None or not math.isfinite(candidate):
        return Decision("kept", f"this version has no {metric} on its held-out rows")
    if champion is None or not math.isfinite(champion):
        return Decision(
            "promoted", f"champion v{champion_version} has no {metric} on these rows; this has"
        )
    gain = candidate - champion if greater_is_better else champion - candidate
    compared = (
        f"{metric} {candidate:.4g} vs champion v{champion_version} {champion:.4g} on the same "
        f"held-out rows ({'higher' if greater_is_better else 'lower'} is better, "
        f"min delta {min_delta:g})"
    )
    if gain > min_delta:
        return Decision("promoted", f"better: {compared}")
    return Decision("kept", f"{'a tie' if abs(gain) <= min_delta else 'worse'}: {compared}")


def model_card(
    *,
    name: str,
    version: str,
    base_model: str,
    objective: str,
    steps: int,
    silver: str,
    report: PromotionReport,
) -> str:
    """A short markdown model card for the version's description."""
    ev = report.evaluation
    rows = ""
    metrics = sorted({*ev.base, *ev.candidate, *report.champion})
    champion = f"champion v{report.champion_version}" if report.champion_version else "champion"
    if metrics:
        rows = f"| metric | base model | this version | {champion} |\n|---|---|---|---|\n"
        rows += "".join(
            f"| {m} | {_num(ev.base.get(m))} | {_num(ev.candidate.get(m))} | "
            f"{_num(report.champion.get(m))} |\n"
            for m in metrics
        )
    held_out = (
        f"{ev.eval_set.rows} held-out rows of `{ev.eval_set.table_uri}` version "
        f"{ev.eval_set.version} (row-id hash `{ev.eval_set.hash}`)"
        if ev.eval_set
        else "no held-out rows"
    )
    return (
        f"# {name} v{version}\n\n"
        f"Fine-tuned from `{base_model}` with objective `{objective}` for {steps} steps.\n\n"
        f"**Data**: {silver}.\n\n"
        f"**Evaluation** on {held_out}, one scoring code for all three:\n\n{rows}\n"
        f"**Decision**: {report.decision.outcome}: {report.decision.reason}.\n\n"
        "**Use**: `mlflow.pyfunc.load_model('models:/"
        f"{name}/{version}')`, then `.predict(pd.DataFrame({{'text': [...]}}))` (column "
        "`src_lang` or param `src_lang` for mBART); over REST: `make serve` serves "
        f"`models:/{name}@champion`.\n"
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
