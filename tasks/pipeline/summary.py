"""The pipeline run's summary: what each layer did, where to look, numbers rounded for people."""

from __future__ import annotations

import math
from typing import Any


def mlflow_links(
    tracking_uri: str, run_id: str | None, model_name: str | None, model_version: str | None
) -> dict[str, str]:
    """UI links of an MLflow run and model version (only for an http(s) tracking server)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return {}
    base = tracking_uri.rstrip("/")
    links = {}
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
            links["run"] = f"{base}/#/experiments/{experiment}/runs/{run_id}"
        except Exception:  # noqa: BLE001 - a link is a convenience; the id is printed anyway
            pass
    if model_name and model_version:
        links["model"] = f"{base}/#/models/{model_name}/versions/{model_version}"
    return links


def summary_markdown(
    bronze: dict[str, Any],
    silver: dict[str, Any],
    train: dict[str, Any] | None,
    skipped_train: str | None,
    infra: str | None,
    tracking_uri: str,
) -> str:
    """The pipeline run as markdown: rows per layer, rejects by reason, MLflow run and model."""
    lines = [
        "# Lakehouse pipeline run",
        "",
        "| layer | batches | rows | where |",
        "|---|---|---|---|",
    ]
    lines.append(
        f"| bronze | {len(bronze.get('batch_ids', []))} | {bronze.get('rows', 0)} "
        f"| `{bronze.get('uri', '')}` |"
    )
    lines.append(
        f"| silver | {len(silver.get('batch_ids', []))} | {silver.get('rows', 0)} "
        f"| `{silver.get('uri', '')}` |"
    )
    for layer, res in (("bronze", bronze), ("silver", silver)):
        if res.get("message"):
            lines.append(f"\n**{layer}**: {res['message']}")
    rejected = silver.get("rejected") or {}
    lines += ["", "## Rejected rows by reason", ""]
    if rejected:
        lines += ["| reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in sorted(rejected.items())]
        lines.append(f"| **total** | {sum(rejected.values())} |")
    else:
        lines.append("none")
    lines += ["", "## Training", ""]
    if train is None:
        lines.append(f"skipped: {skipped_train}")
        return "\n".join(lines) + "\n"
    links = mlflow_links(
        tracking_uri,
        train.get("mlflow_run_id"),
        train.get("model_name"),
        train.get("model_version"),
    )
    run = train.get("mlflow_run_id") or "-"
    model = (
        f"{train.get('model_name')} v{train.get('model_version')}"
        if train.get("model_version")
        else "-"
    )
    lines += [
        f"- infrastructure: `{infra}`",
        f"- steps: {train.get('global_step')}, "
        f"train loss {human_number(train.get('train_loss'))}, "
        f"eval loss {human_number(train.get('eval_loss'))}",
        f"- tokens: {human_number(train.get('tokens_seen'))} "
        f"({human_number(train.get('tokens_per_second'))} tokens/s)",
        f"- MLflow run: [{run}]({links['run']})" if "run" in links else f"- MLflow run: `{run}`",
        f"- registered model: [{model}]({links['model']})"
        if "model" in links
        else f"- registered model: `{model}`",
        f"- tracking URI: `{tracking_uri}`",
        f"- checkpoint: `{train.get('checkpoint_uri', '')}`",
    ]
    if train.get("resumed_from_step") is not None:
        lines.append(f"- resumed from step {train['resumed_from_step']}")
    lines += promotion_lines(train.get("promotion"))
    return "\n".join(lines) + "\n"


def promotion_lines(promotion: dict[str, Any] | None) -> list[str]:
    """Base, candidate and champion on one held-out set, the set's identity and the decision."""
    if not promotion:
        return []
    evaluation = promotion.get("evaluation") or {}
    held_out = evaluation.get("eval_set")
    lines = ["", "## Held-out evaluation and promotion", ""]
    if held_out:
        lines.append(
            f"{held_out['rows']} held-out rows of `{held_out['table_uri']}` version "
            f"{held_out['version']} (row-id hash `{held_out['hash']}`), one scoring code:"
        )
    else:
        lines.append("no held-out rows (train.eval_fraction)")
    base, candidate = evaluation.get("base") or {}, evaluation.get("candidate") or {}
    champion = promotion.get("champion") or {}
    metrics = sorted({*base, *candidate, *champion})
    if metrics:
        who = (
            f"champion v{promotion['champion_version']}"
            if promotion.get("champion_version")
            else "champion"
        )
        lines += ["", f"| metric | base model | this version | {who} |", "|---|---|---|---|"]
        lines += [
            f"| {m} | {human_number(base.get(m))} | {human_number(candidate.get(m))} "
            f"| {human_number(champion.get(m))} |"
            for m in metrics
        ]
    decision = promotion.get("decision") or {}
    lines += [
        "",
        f"**{decision.get('outcome')}** ({promotion.get('metric')}): {decision.get('reason')}",
    ]
    return lines


def human_number(value: Any) -> str:
    """A measured number as people read it: 18,882 (not 18881.53157125749), 2.346, 0.000123."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
