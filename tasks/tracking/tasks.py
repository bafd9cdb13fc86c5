"""Prefect tasks of the tracking stage: open the MLflow run, then log and register the model.

The only module of the stage that imports Prefect: it reads the MLflow token from its Prefect
Secret block and the flow run's identity from the Prefect runtime, and passes both down as plain
values, so the modules beside it run where Prefect is not (a torchrun rank logs metrics through
tasks/tracking/callback.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.params import TrackingParams
from tasks.retry import STORAGE_RETRIES
from tasks.tracking.finish import finish_run
from tasks.tracking.registry import register_model
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


@task(name="finish-tracking", **STORAGE_RETRIES)
def finish_tracking(
    *,
    run_id: str,
    tracking: TrackingParams,
    plan: TrainPlan,
    outcome: TrainOutcome,
    params: dict[str, Any],
) -> tuple[str, str]:
    """Log the final model, metrics and artifacts to the run, then register the model.

    Both steps are idempotent, so a re-run after a crash anywhere in here (or a re-run of an
    already trained model) completes what is missing: one logged model, one version.
    """
    token = tracking_token(tracking)
    if outcome.already_trained and close_if_logged(run_id, tracking.uri, token=token):
        get_run_logger().info("MLflow run %s has its model; checking its registration", run_id)
    else:
        artifacts = {
            name: path
            for name, path in (
                ("loss_curve", outcome.loss_curve_path),
                ("training", outcome.log_history_path),
            )
            if path and Path(path).is_file()
        }
        metrics = {
            k: v
            for k, v in outcome.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        finish_run(
            run_id,
            tracking.uri,
            local_final_model(plan, outcome),
            metrics,
            artifacts,
            plan.manifest_documents(),
            params,
            token=token,
            step=outcome.global_step,
            lakehouse_root=plan.root,
        )
    name, version = register_model(
        run_id,
        tracking.uri,
        tracking.registered_model,
        {"run_name": plan.run_name, "objective": str(params.get("train.objective", ""))},
        tracking.champion_metric,
        tracking.champion_greater_is_better,
        token=token,
        model_dir=outcome.final_model_dir,
    )
    return name, str(version)


@task(name="find-pinned-versions", **STORAGE_RETRIES)
def find_pinned_versions(*, tracking: TrackingParams) -> dict[str, list[int]]:
    """Silver table versions that registered model versions were trained on."""
    from tasks.tracking.pins import pinned_silver_versions

    return pinned_silver_versions(
        tracking.uri, tracking.registered_model, tracking_token(tracking)
    )
