"""Prefect tasks of the training layer: thin wrappers over tasks.train.run (URIs and scalars in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES
from tasks.train import run as training


def progress_callback(run_name: str, max_steps: int):
    """A TrainerCallback that keeps a Prefect progress artifact at the share of steps done."""
    from transformers import TrainerCallback

    class PrefectProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.artifact_id = None
            self.every = max(1, max_steps // 50)  # ~50 updates per run: visible, not chatty
            self.failed = False

        def _progress(self, state) -> float:
            return round(100.0 * state.global_step / max(1, max_steps), 1)

        def _call(self, fn, *args, **kwargs) -> Any:
            if self.failed:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - progress must never stop training
                self.failed = True
                get_run_logger().warning("progress artifact disabled: %s", exc)
                return None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.artifact_id = self._call(
                    create_progress_artifact,
                    progress=self._progress(state),
                    key=artifact_key("train-progress", run_name),
                    description=f"Training {run_name}: step {state.global_step}/{max_steps}",
                )

        def on_step_end(self, args, state, control, **kwargs):
            if self.artifact_id and (
                state.global_step % self.every == 0 or state.global_step >= max_steps
            ):
                self._call(
                    update_progress_artifact,
                    self.artifact_id,
                    self._progress(state),
                    description=f"Training {run_name}: step {state.global_step}/{max_steps}",
                )

    return PrefectProgressCallback()


@task(name="plan-training", **STORAGE_RETRIES)
def plan_train(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    model: dict[str, Any],
    train: dict[str, Any],
) -> dict[str, Any]:
    """Find committed silver for the model's tokenizer and name the run (checks fit and lengths)."""
    logger = get_run_logger()
    plan = training.plan_training(root, block, dataset_key, language, model, train)
    logger.info(
        "silver %s: %d committed batch(es), %d rows; run %s -> %s",
        plan["table_uri"],
        len(plan["batch_ids"]),
        plan["rows"],
        plan["run_name"],
        plan["output_uri"],
    )
    return plan


@task(name="train-model")
def train_model(
    plan: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train or resume the run (one process per GPU with torchrun when several are visible)."""
    logger = get_run_logger()
    gpus = _visible_gpus() if train.get("device", "auto") != "cpu" else 0
    if gpus > 1 and "RANK" not in os.environ:
        return _train_distributed(plan, model, train, mlflow_run_id, tracking_uri, gpus)
    callbacks = [progress_callback(plan["run_name"], train["max_steps"])]
    metrics_cb = mlflow_callback(mlflow_run_id, tracking_uri)
    if metrics_cb is not None:
        callbacks.append(metrics_cb)
    result = training.train_model(plan, model, train, callbacks)
    logger.info(result.get("message", ""))
    return result


def mlflow_callback(run_id: str | None, uri: str | None):
    """tasks.tracking.runs's MlflowMetricsCallback, when tracking is available and a run is open."""
    if not run_id:
        return None
    try:
        from tasks.tracking.runs import MlflowMetricsCallback
    except ImportError:
        return None
    return MlflowMetricsCallback(run_id, uri)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _train_distributed(
    plan: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    run_id: str | None,
    uri: str | None,
    gpus: int,
) -> dict[str, Any]:
    """Data-parallel training: torchrun starts `python -m tasks.train.run` once per GPU."""
    logger = get_run_logger()
    folder = Path(plan["local_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    spec, out = folder / "spec.json", folder / "result.json"
    spec.write_text(
        json.dumps(
            {
                "plan": plan,
                "model": model,
                "train": train,
                "mlflow_run_id": run_id,
                "tracking_uri": uri,
            }
        )
    )
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "tasks.train.run",
        str(spec),
        str(out),
    ]
    logger.info("data parallel on %d GPUs: %s", gpus, " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # stream Trainer's progress into the flow's logs
        print(line.rstrip(), flush=True)
    if proc.wait() != 0 or not out.is_file():
        raise training.TrainingError(
            f"distributed training exited with {proc.returncode}; "
            "see the log above (rank 0 prints the cause)"
        )
    return json.loads(out.read_text())


@task(name="publish-training")
def publish_train(run_name: str, result: dict[str, Any], plan: dict[str, Any]) -> None:
    """A markdown artifact: where the checkpoints, model, curve and metrics are."""
    metrics = result.get("metrics") or {}
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    create_markdown_artifact(
        key=artifact_key("train", run_name),
        markdown=(
            f"# Training {run_name}\n\n{result.get('message', '')}\n\n"
            f"- silver: `{plan['table_uri']}` ({len(plan['batch_ids'])} batches, "
            f"{plan['rows']} rows)\n"
            f"- checkpoints: `{result.get('output_uri')}` "
            f"(last: `{result.get('checkpoint_uri')}`)\n"
            f"- final model: `{result.get('final_model_uri')}`\n"
            f"- loss curve: `{result.get('loss_curve_uri')}`\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n"
        ),
        description=f"Training run {run_name}",
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@task(name="start-tracking", **STORAGE_RETRIES)
def start_tracking(
    uri: str,
    experiment: str,
    run_key: str,
    params: dict[str, Any],
    tags: dict[str, str],
    token_secret: str | None,
) -> str:
    """Open (or reuse, by run key) the MLflow run of this training."""
    from tasks.tracking import runs as tracking

    return tracking.start_run(uri, experiment, run_key, params, tags, token_secret)


@task(name="finish-tracking", **STORAGE_RETRIES)
def finish_tracking(
    run_id: str,
    uri: str,
    result: dict[str, Any],
    plan: dict[str, Any],
    params: dict[str, Any],
    registered_model: str,
    champion_metric: str,
    greater_is_better: bool,
    token_secret: str | None = None,
) -> tuple[str, str]:
    """Log the final model, metrics and artifacts to the run, then register the model.

    Both steps are idempotent, so a re-run after a crash anywhere in here (or a re-run of an
    already trained model) completes what is missing: one logged model, one version.
    """
    from tasks.tracking import runs as tracking

    if result.get("already_trained") and tracking.close_if_logged(run_id, uri, token_secret):
        get_run_logger().info("MLflow run %s has its model; checking its registration", run_id)
    else:
        artifacts = {
            name: result[key]
            for name, key in (("loss_curve", "loss_curve_path"), ("training", "log_history_path"))
            if result.get(key) and Path(result[key]).is_file()
        }
        metrics = {
            k: v
            for k, v in (result.get("metrics") or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        tracking.finish_run(
            run_id,
            uri,
            training.local_final_model(plan, result),
            metrics,
            artifacts,
            plan["manifests"],
            params,
            token_secret=token_secret,
            step=result["global_step"],
            lakehouse_root=plan["root"],
        )
    name, version = tracking.register_model(
        run_id,
        uri,
        registered_model,
        {"run_name": plan["run_name"], "objective": str(params.get("train.objective", ""))},
        champion_metric,
        greater_is_better,
        token_secret,
        model_dir=result["final_model_dir"],
    )
    return name, str(version)
