"""Prefect tasks of the training stage: plan, train (in process or on torchrun ranks), publish.

The only module of the stage that imports Prefect: the plain modules beside it run the same way
in the flow's process and in torchrun ranks, which have no Prefect API to talk to.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES
from tasks.train.launch import LaunchSpec, launch_ranks, resolve_processes, visible_gpus
from tasks.train.outcome import TrainOutcome
from tasks.train.plan import TrainPlan, build_train_plan, work_dir
from tasks.train.run import finished_outcome, fit_model
from tasks.train.trainer import StepProgressCallback


class PrefectProgress:
    """A Prefect progress artifact at the share of steps done; never stops training."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.artifact_id = None
        self.failed = False

    def report(self, step: int, max_steps: int) -> None:
        if self.failed:
            return
        progress = round(100.0 * step / max(1, max_steps), 1)
        description = f"Training {self.run_name}: step {step}/{max_steps}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=progress,
                    key=artifact_key("train-progress", self.run_name),
                    description=description,
                )
            else:
                update_progress_artifact(self.artifact_id, progress, description=description)
        except Exception as exc:  # noqa: BLE001 - progress must never stop training
            self.failed = True
            get_run_logger().warning("progress artifact disabled: %s", exc)


@task(name="plan-training", **STORAGE_RETRIES)
def plan_train(
    *,
    lakehouse: LakehouseParams,
    source: SourceParams,
    model: ModelParams,
    train: TrainParams,
) -> TrainPlan:
    """Find committed silver for the model's tokenizer and name the run (checks fit and lengths)."""
    plan = build_train_plan(lakehouse=lakehouse, source=source, model=model, train=train)
    get_run_logger().info(
        "silver %s version %d: %d committed batch(es), %d rows; run %s -> %s",
        plan.table_uri,
        plan.silver.version,
        len(plan.batch_ids),
        plan.rows,
        plan.run_name,
        plan.output_uri,
    )
    return plan


@task(name="train-model")
def train_model(
    *,
    plan: TrainPlan,
    model: ModelParams,
    train: TrainParams,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrainOutcome:
    """Train or resume the run: in this process, or on `train.processes` torchrun ranks."""
    logger = get_run_logger()
    if (done := finished_outcome(plan, train)) is not None:
        logger.info(done.message)
        return done
    processes = resolve_processes(train, visible_gpus() if train.device != "cpu" else 0)
    progress = PrefectProgress(plan.run_name)
    if processes > 1:
        outcome = launch_ranks(
            LaunchSpec(
                plan=plan,
                model=model,
                train=train,
                mlflow_run_id=mlflow_run_id,
                tracking_uri=tracking_uri,
            ),
            processes=processes,
            folder=work_dir() / "launch" / plan.run_name,
            on_line=logger.info,
            on_step=lambda step: progress.report(step, train.max_steps),
        )
    else:
        callbacks = [StepProgressCallback(progress.report, train.max_steps)]
        metrics_cb = mlflow_callback(mlflow_run_id, tracking_uri)
        if metrics_cb is not None:
            callbacks.append(metrics_cb)
        outcome = fit_model(plan=plan, model=model, train=train, callbacks=callbacks)
    logger.info(outcome.message)
    return outcome


def mlflow_callback(run_id: str | None, uri: str | None):
    """The MLflow metrics callback (tasks/tracking/callback.py) when a run is open, else None."""
    if not run_id:
        return None
    try:
        from tasks.tracking.callback import MlflowMetricsCallback
    except ImportError:
        return None
    return MlflowMetricsCallback(run_id, uri)


@task(name="publish-training")
def publish_train(*, plan: TrainPlan, outcome: TrainOutcome) -> None:
    """A markdown artifact: where the checkpoints, model, curve and metrics are."""
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in outcome.metrics.items())
    create_markdown_artifact(
        key=artifact_key("train", plan.run_name),
        markdown=(
            f"# Training {plan.run_name}\n\n{outcome.message}\n\n"
            f"- silver: `{plan.table_uri}` version {plan.silver.version} "
            f"({len(plan.batch_ids)} batches, {plan.rows} rows)\n"
            f"- checkpoints: `{outcome.output_uri}` "
            f"(last: `{outcome.checkpoint_uri}`)\n"
            f"- final model: `{outcome.final_model_uri}`\n"
            f"- loss curve: `{outcome.loss_curve_uri}`\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n"
        ),
        description=f"Training run {plan.run_name}",
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
