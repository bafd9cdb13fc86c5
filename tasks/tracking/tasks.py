"""Prefect tasks of the tracking stage: open the MLflow run; after training, score base and
fine-tuned model on the held-out rows, log the model, register it and decide the champion.

The only module of the stage that imports Prefect: it reads the MLflow token from its Prefect
Secret block and the flow run's identity from the Prefect runtime, and passes both down as plain
values, so the modules beside it run where Prefect is not (a torchrun rank logs metrics through
tasks/tracking/callback.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from tasks.params import ModelParams, TrackingParams, TrainParams
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES
from tasks.tracking.eval_set import load_eval_set
from tasks.tracking.evaluation import evaluate_model, sample_rows
from tasks.tracking.finish import finish_run, log_evaluation, read_evaluation
from tasks.tracking.inference import download_model_folder
from tasks.tracking.lineage import silver_version_tags
from tasks.tracking.promotion import (
    CandidateEvaluation,
    Decision,
    PromotionReport,
    Registration,
    decide,
    model_card,
    not_comparable,
)
from tasks.tracking.registry import champion_of, record_promotion, register_model, version_of
from tasks.tracking.runs import close_if_logged, start_run
from tasks.train.outcome import TrainOutcome
from tasks.train.plan import TrainPlan
from tasks.train.run import local_final_model

log = logging.getLogger(__name__)


def tracking_token(tracking: TrackingParams) -> str | None:
    """The bearer token of an http(s) MLflow server, from the Prefect Secret block
    `tracking.token_secret`; None for other URIs or when the block does not exist."""
    if not tracking.token_secret or not tracking.uri.strip().startswith(("http://", "https://")):
        return None
    from blocks.secret import load_secret

    try:
        return load_secret(tracking.token_secret) or None
    except Exception as exc:  # noqa: BLE001 - no Prefect API: anonymous, like a missing block
        log.warning(
            "could not read the Prefect Secret block %r (%s): no MLflow token sent",
            tracking.token_secret,
            type(exc).__name__,
        )
        return None


def prefect_run_tags() -> dict[str, str]:
    """Tags linking the MLflow run to the Prefect flow run and deployment (when there is one)."""
    tags: dict[str, str] = {}
    try:
        from prefect.runtime import deployment, flow_run

        if flow_run.id:
            tags.update(
                {
                    "prefect.flow_run_id": str(flow_run.id),
                    "prefect.flow_run_name": str(flow_run.name or ""),
                    "prefect.flow_name": str(flow_run.flow_name or ""),
                }
            )
            url = flow_run.ui_url
            if url and str(url).startswith(("http://", "https://")):
                tags["prefect.flow_run_url"] = str(url)
            if flow_run.parent_flow_run_id:
                tags["prefect.parent_flow_run_id"] = str(flow_run.parent_flow_run_id)
        if deployment.id:
            tags["prefect.deployment_id"] = str(deployment.id)
            tags["prefect.deployment"] = str(deployment.name or "")
    except Exception as exc:  # noqa: BLE001 - tags are informative; never fail a run on them
        log.debug("no Prefect runtime tags: %s", exc)
    return {k: v for k, v in tags.items() if v}


@task(name="start-tracking", **STORAGE_RETRIES)
def start_tracking(
    *,
    tracking: TrackingParams,
    run_key: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> str:
    """Open (or reuse, by run key) the MLflow run of this training."""
    return start_run(
        tracking.uri,
        tracking.experiment,
        run_key,
        params,
        {**prefect_run_tags(), **tags},
        token=tracking_token(tracking),
    )


@task(name="evaluate-candidate", **STORAGE_RETRIES)
def evaluate_candidate(
    *,
    run_id: str,
    tracking: TrackingParams,
    plan: TrainPlan,
    outcome: TrainOutcome,
    model: ModelParams,
    train: TrainParams,
) -> CandidateEvaluation:
    """Score the base model and the fine-tuned one on the held-out rows; log both, and samples.

    Done once per run: a re-run finds the evaluation on the MLflow run and returns it.
    """
    logger = get_run_logger()
    token = tracking_token(tracking)
    recorded = read_evaluation(tracking.uri, run_id, token=token)
    if recorded is not None:
        logger.info("MLflow run %s already has its held-out evaluation", run_id)
        return recorded
    eval_set = load_eval_set(plan=plan, model=model, train=train)
    if len(eval_set) == 0:
        logger.warning("no held-out rows (train.eval_fraction): nothing to evaluate on")
        return CandidateEvaluation(eval_set=None)
    base = evaluate_model(model.name_or_path, eval_set, revision=model.revision)
    tuned = evaluate_model(local_final_model(plan, outcome), eval_set)
    rows = sample_rows(eval_set)
    evaluation = CandidateEvaluation(
        eval_set=eval_set.identity,
        base=base.metrics,
        candidate=tuned.metrics,
        examples=rows.inputs[:2],
        lang_code=eval_set.lang_code,
    )
    samples = [
        {"input": i, "reference": r, "base_output": b, "fine_tuned_output": f}
        for i, r, b, f in zip(
            rows.inputs, rows.references, base.samples, tuned.samples, strict=False
        )
    ]
    log_evaluation(
        tracking.uri, run_id, evaluation, step=outcome.global_step, samples=samples, token=token
    )
    create_table_artifact(
        key=artifact_key("samples", plan.run_name),
        table=samples,
        description=f"Generations on held-out rows: base model vs {plan.run_name}",
    )
    logger.info(
        "held-out evaluation on %d rows: base %s | fine-tuned %s",
        eval_set.identity.rows,
        _fmt_scores(base.metrics),
        _fmt_scores(tuned.metrics),
    )
    return evaluation


@task(name="finish-tracking", **STORAGE_RETRIES)
def finish_tracking(
    *,
    run_id: str,
    tracking: TrackingParams,
    plan: TrainPlan,
    outcome: TrainOutcome,
    train: TrainParams,
    params: dict[str, Any],
    evaluation: CandidateEvaluation,
) -> None:
    """Log the final model, metrics, lineage and artifacts to the run, and end it.

    Idempotent, so a re-run after a crash anywhere in here (or a re-run of an already trained
    model) completes what is missing: one logged model.
    """
    token = tracking_token(tracking)
    if outcome.already_trained and close_if_logged(run_id, tracking.uri, token=token):
        get_run_logger().info("MLflow run %s has its model; checking its registration", run_id)
        return
    metrics = {
        k: v
        for k, v in outcome.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    # The loss curve is drawn from the run's metrics, so it starts at the base model (step 0).
    artifacts = {"training": outcome.log_history_path} if outcome.log_history_path else {}
    finish_run(
        run_id,
        tracking.uri,
        local_final_model(plan, outcome),
        metrics,
        {k: v for k, v in artifacts.items() if Path(v).is_file()},
        plan.manifest_documents(),
        params,
        silver_version_tags(plan.silver.uri, plan.silver.version, plan.silver.rows),
        token=token,
        step=outcome.global_step,
        lakehouse_root=plan.root,
        input_examples=list(evaluation.examples) or None,
        model_config={"objective": train.objective, "src_lang": evaluation.lang_code},
    )


@task(name="register-candidate", **STORAGE_RETRIES)
def register_candidate(
    *,
    run_id: str,
    tracking: TrackingParams,
    plan: TrainPlan,
    outcome: TrainOutcome,
    model: ModelParams,
    train: TrainParams,
    evaluation: CandidateEvaluation,
) -> Registration:
    """Register the run's model (alias `candidate`); it becomes `champion` only when it beats
    the champion, scored by the same code on this run's held-out rows (promotion.py)."""
    logger = get_run_logger()
    token = tracking_token(tracking)
    uri, name = tracking.uri, tracking.registered_model
    name, version = register_model(
        run_id,
        uri,
        name,
        {
            "run_name": plan.run_name,
            "objective": train.objective,
            "tokenizer_fingerprint": plan.tokenizer_fingerprint,
            "silver_table": plan.silver.uri,
            "silver_version": str(plan.silver.version),
        },
        token=token,
        model_dir=outcome.final_model_dir,
    )
    this = version_of(uri, name, version, token=token)
    champion = champion_of(uri, name, token=token)
    champion_scores: dict[str, float] = {}
    if champion is None or champion.version == version:
        decision = Decision(
            this.tags.get("promotion.decision", "first"),  # type: ignore[arg-type]
            this.tags.get("promotion.reason", "the first version: no champion to compare with"),
        )
        champion_scores = _scores_from(this.tags, "eval.champion.")
    elif reason := not_comparable(this.tags, champion.tags):
        decision = Decision("not_comparable", f"not compared with v{champion.version}: {reason}")
    elif evaluation.eval_set is None:
        decision = Decision("kept", "this version has no held-out rows to be compared on")
    else:
        champion_scores = _score_champion(uri, name, champion.version, plan, model, train, token)
        decision = decide(
            metric=tracking.champion_metric,
            greater_is_better=tracking.champion_greater_is_better,
            min_delta=tracking.champion_min_delta,
            candidate=evaluation.candidate.get(tracking.champion_metric),
            champion=champion_scores.get(tracking.champion_metric),
            champion_version=champion.version,
        )
    report = PromotionReport(
        metric=tracking.champion_metric,
        decision=decision,
        evaluation=evaluation,
        champion=champion_scores,
        champion_version=champion.version if champion and champion.version != version else None,
    )
    card = model_card(
        name=name,
        version=version,
        base_model=model.name_or_path,
        objective=train.objective,
        steps=outcome.global_step,
        silver=f"`{plan.silver.uri}` version {plan.silver.version}, {plan.silver.rows} rows",
        report=report,
    )
    promote = decision.outcome == "promoted" and champion is not None
    record_promotion(
        uri,
        name,
        version,
        tags=report.version_tags(),
        description=card,
        promote=promote,
        token=token,
    )
    logger.info("%s version %s: %s (%s)", name, version, decision.outcome, decision.reason)
    return Registration(name=name, version=version, report=report)


def _score_champion(
    uri: str,
    name: str,
    version: str,
    plan: TrainPlan,
    model: ModelParams,
    train: TrainParams,
    token: str | None,
) -> dict[str, float]:
    """The champion's scores on this run's held-out rows (its folder fetched from MLflow)."""
    eval_set = load_eval_set(plan=plan, model=model, train=train)
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        folder = download_model_folder(uri, name, version, Path(tmp), token=token)
        return evaluate_model(folder, eval_set).metrics


def _scores_from(tags: dict[str, str], prefix: str) -> dict[str, float]:
    return {
        k[len(prefix) :]: float(v)
        for k, v in tags.items()
        if k.startswith(prefix) and k != f"{prefix}version"
    }


def _fmt_scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


@task(name="find-pinned-versions", **STORAGE_RETRIES)
def find_pinned_versions(*, tracking: TrackingParams) -> dict[str, list[int]]:
    """Silver table versions that registered model versions were trained on."""
    from tasks.tracking.pins import pinned_silver_versions

    return pinned_silver_versions(tracking.uri, tracking.registered_model, tracking_token(tracking))
