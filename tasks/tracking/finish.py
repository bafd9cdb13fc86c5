"""The end of a training run in MLflow: held-out evaluation, final metrics, lineage,
artifacts and the model.

`log_evaluation` and `finish_run` are idempotent, because a flow killed while they run is
simply re-run: what is already logged is not logged twice, and a model logged by an earlier
attempt is reused. Nothing secret reaches the run: params and tags are scrubbed, files with
credentials are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.secrets import file_has_secret, redact
from tasks.tracking.callback import MlflowMetricsCallback
from tasks.tracking.lineage import lineage_from_manifests, log_silver_input
from tasks.tracking.logged_model import log_pyfunc, logged_model_id, stage_model
from tasks.tracking.promotion import CandidateEvaluation
from tasks.tracking.runs import MODEL_DIR_TAG, MODEL_ID_TAG
from tasks.tracking.scrub import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, scrub, valid_key
from tasks.tracking.server import TrackingError, configure_tracking, mlflow_client, with_retries
from tasks.train.metrics import plot_loss_curve

log = logging.getLogger(__name__)

_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*\.json|special_tokens_map\.json|added_tokens\.json|spiece\.model|"
    r"sentencepiece\.bpe\.model|vocab.*|merges\.txt|chat_template.*)$"
)


def finish_run(
    run_id: str,
    uri: str,
    model_dir: str | Path,
    metrics: dict,
    artifacts: dict[str, str | Path],
    silver_manifests: list[dict],
    params: dict | None = None,
    lineage_tags: dict | None = None,
    *,
    token: str | None = None,
    step: int | None = None,
    lakehouse_root: str | None = None,
    input_examples: list[str] | None = None,
    model_config: dict | None = None,
    metrics_callback: MlflowMetricsCallback | None = None,
    retry_for_s: float | None = None,
    status: str = "FINISHED",
) -> None:
    """Log final metrics, lineage, the silver dataset, artifacts and the pyfunc model; end the run.

    `artifacts` maps a destination folder in the run (config, tokenizer, plots, manifests) to a
    local file or folder. A loss-curve image is drawn from the run's metrics unless given as
    `loss_curve`. Idempotent: a re-run after a failure logs what is missing and reuses a model
    already logged for this run.
    """
    from mlflow.entities import Metric, Param, RunTag

    uri = configure_tracking(uri, token)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise TrackingError(
            f"{model_dir}: not a saved Hugging Face model folder (no config.json); pass the "
            "folder written by trainer.save_model()/save_pretrained()"
        )
    clean_params = scrub(params or {}, "param", on_secret="drop")
    tags = {
        **lineage_from_manifests(silver_manifests, lakehouse_root),
        **scrub(lineage_tags or {}, "tag", on_secret="drop"),
        MODEL_DIR_TAG: str(model_dir),
    }
    tags = scrub(tags, "tag", on_secret="drop")
    if step is None:
        step = int(metrics.get("global_step") or 0)
    now = int(time.time() * 1000)
    metric_list = [
        Metric(valid_key(k), float(v), now, step)
        for k, v in metrics.items()
        if not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(float(v))
    ]
    work = Path(tempfile.mkdtemp(prefix="mlflow-finish-"))
    try:
        lineage_file = work / "lineage" / "silver_manifests.json"
        lineage_file.parent.mkdir(parents=True)
        lineage_file.write_text(json.dumps(redact(silver_manifests), indent=2, default=str))
        to_log = {"lineage": lineage_file, **_safe_artifacts(artifacts)}
        staged = stage_model(model_dir, work / "hf-model")
        if "tokenizer" not in to_log:
            to_log.update(
                _safe_artifacts({"tokenizer": _tokenizer_files(staged, work / "tokenizer")})
            )

        def attempt() -> None:
            client = mlflow_client(uri)
            if metrics_callback is not None and not metrics_callback.flush():
                raise ConnectionError("buffered training metrics could not be sent")
            run = client.get_run(run_id)
            new = [Param(k, v) for k, v in clean_params.items() if k not in run.data.params]
            tag_list = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, max(len(new), len(tag_list)), MAX_PARAMS_PER_BATCH):
                client.log_batch(
                    run_id,
                    params=new[i : i + MAX_PARAMS_PER_BATCH],
                    tags=tag_list[i : i + MAX_PARAMS_PER_BATCH],
                )
            # A re-run after a failure does not log the same final values twice.
            fresh = [m for m in metric_list if run.data.metrics.get(m.key) != m.value]
            for i in range(0, len(fresh), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=fresh[i : i + MAX_METRICS_PER_BATCH])
            if silver_manifests:
                log_silver_input(client, run_id, silver_manifests, lakehouse_root)
            if "config" not in to_log:
                config = write_resolved_config(
                    clean_params or run.data.params, work / "config" / "resolved_config.yaml"
                )
                to_log["config"] = config
            for dest, path in to_log.items():
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=dest)
                else:
                    client.log_artifact(run_id, str(path), artifact_path=dest)
            if "loss_curve" not in artifacts:
                image = draw_loss_curve(client, run_id, work / "plots" / "loss_curve.png")
                if image is not None:
                    client.log_artifact(run_id, str(image), artifact_path="plots")
            model_id = logged_model_id(client, run_id)
            if model_id is None:
                model_id = log_pyfunc(uri, run_id, staged, input_examples, model_config)
            client.set_tag(run_id, MODEL_ID_TAG, model_id)
            client.set_terminated(run_id, status)

        with_retries(attempt, f"finishing MLflow run {run_id}", uri, retry_for_s, model_dir)
        log.info("MLflow run %s finished: model, metrics, lineage and artifacts logged", run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_resolved_config(flat: dict[str, str], out: Path) -> Path:
    """The (secret-free) flattened parameters as a nested YAML file."""
    import yaml

    tree: dict[str, Any] = {}
    for key, text in sorted(flat.items()):
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            value = text
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else node
        node[parts[-1]] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return out


def _tokenizer_files(model_dir: Path, out: Path) -> Path:
    """The tokenizer files of a saved model folder, copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and _TOKENIZER_FILE.match(item.name):
            shutil.copy2(item, out / item.name)
    return out


def _safe_artifacts(artifacts: dict[str, str | Path]) -> dict[str, Path]:
    """The artifacts that exist and hold no secret (others are skipped with a warning)."""
    out: dict[str, Path] = {}
    for dest, src in artifacts.items():
        path = Path(src)
        if not path.exists():
            log.warning("artifact %s: %s does not exist; not logged", dest, path)
            continue
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        bad = next((p for p in files if file_has_secret(p)), None)
        if bad is not None:
            log.warning("artifact %s not logged: %s looks like it holds a credential", dest, bad)
            continue
        # The loss curve goes where finish_run would draw it.
        folder = "plots" if dest == "loss_curve" else valid_key(dest).strip("/")
        out[folder or "artifacts"] = path
    return out


def draw_loss_curve(client, run_id: str, out: Path) -> Path | None:
    """Train and eval loss by step from the run's metric history (so the base model's step-0
    point and every resumed segment are on it); None when the run has no loss yet."""
    history = [
        {"step": m.step, key: m.value}
        for key in ("loss", "eval_loss")
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    ]
    if not history:
        return None
    return plot_loss_curve(history, out, title=client.get_run(run_id).info.run_name or "")


SAMPLES_FILE = "eval/samples.json"


def log_evaluation(
    uri: str,
    run_id: str,
    evaluation: CandidateEvaluation,
    *,
    step: int,
    samples: list[dict[str, str]],
    token: str | None = None,
    retry_for_s: float | None = None,
) -> None:
    """Log the held-out evaluation to the run: the base model's scores as step 0 of every
    curve, the candidate's at `step`, the generation samples as a table, then the tags that
    `read_evaluation` reads back (last: their presence means the rest is there)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric, RunTag

    uri = configure_tracking(uri, token)
    now = int(time.time() * 1000)
    points = [(k, v, 0) for k, v in evaluation.base.items()]
    points += [(k, v, step) for k, v in evaluation.candidate.items()]
    tags = scrub(evaluation.run_tags(), "tag", on_secret="drop")

    def attempt() -> None:
        client = mlflow_client(uri)
        fresh = [
            Metric(valid_key(k), float(v), now, s)
            for k, v, s in points
            if math.isfinite(v)
            and not any(
                m.step == s and m.value == float(v) for m in client.get_metric_history(run_id, k)
            )
        ]
        if fresh:
            client.log_batch(run_id, metrics=fresh)
        if samples and SAMPLES_FILE not in {
            a.path for a in client.list_artifacts(run_id, SAMPLES_FILE.split("/")[0])
        }:
            mlflow.log_table(pd.DataFrame(samples), artifact_file=SAMPLES_FILE, run_id=run_id)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    with_retries(attempt, f"logging the evaluation of MLflow run {run_id}", uri, retry_for_s)


def read_evaluation(
    uri: str, run_id: str, *, token: str | None = None
) -> CandidateEvaluation | None:
    """The evaluation `log_evaluation` recorded on the run, or None when there is none."""
    uri = configure_tracking(uri, token)
    tags = with_retries(
        lambda: mlflow_client(uri).get_run(run_id).data.tags, f"reading run {run_id}", uri
    )
    return CandidateEvaluation.from_run_tags(tags)
