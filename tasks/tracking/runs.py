"""MLflow runs: one per training run, found again by its run key when training resumes.

A resumed training (train.resume=auto) continues the same MLflow run instead of starting a
second one, so a run's curves and params cover the whole training however often it was
interrupted; two starts racing on one key end with one run (the oldest wins). Params are
immutable in MLflow: the first values stay and a later change is recorded as a tag.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.code_version import code_version
from tasks.lakehouse.layout import slug
from tasks.tracking.scrub import MAX_PARAMS_PER_BATCH, MAX_TAG_VALUE, scrub, truncate
from tasks.tracking.server import configure_tracking, mlflow_client, with_retries

log = logging.getLogger(__name__)

RUN_KEY_TAG = "lakehouse.run_key"
MODEL_ID_TAG = "lakehouse.model_id"  # set when the run's pyfunc model is logged
MODEL_DIR_TAG = "lakehouse.model_dir"


def code_tags() -> dict[str, str]:
    """The code version the run was made with (the project's git SHA)."""
    sha = code_version()
    return {"git_sha": sha, "mlflow.source.git.commit": sha} if sha else {}


def start_run(
    uri: str,
    experiment: str,
    run_key: str,
    params: dict,
    tags: dict,
    *,
    token: str | None = None,
    run_name: str | None = None,
    retry_for_s: float | None = None,
) -> str:
    """Create the MLflow run for `run_key`, or reopen the existing one; returns its run id.

    `tags` may carry the Prefect flow run's tags (tasks.py adds them); the code version is added
    here.
    """
    from mlflow.entities import Param, RunTag

    uri = configure_tracking(uri, token)
    clean_params = scrub(params, "param", on_secret="raise")
    clean_tags = {**code_tags(), **scrub(tags, "tag", on_secret="raise"), RUN_KEY_TAG: run_key}

    def attempt() -> str:
        client = mlflow_client(uri)
        exp_id = _experiment_id(client, uri, experiment)
        run = _find_run(client, exp_id, run_key)
        if run is None:
            name = run_name or clean_tags.get("prefect.flow_run_name") or run_key
            run = client.create_run(exp_id, run_name=truncate(name, 250), tags=clean_tags)
            run = _one_run_per_key(client, exp_id, run_key, run)
            log.info("MLflow run %s created in experiment %r", run.info.run_id, experiment)
        elif run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
            log.info(
                "MLflow run %s (%s) reopened for %s", run.info.run_id, run.info.status, run_key
            )
        run_id = run.info.run_id
        old = run.data.params
        changed = sorted(k for k, v in clean_params.items() if k in old and old[k] != v)
        if changed:
            # MLflow params are immutable: the first values stay, the change is recorded.
            log.warning(
                "params changed since MLflow run %s began (kept the first values): %s",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in clean_params.items() if k not in old]
        history = run.data.tags.get("prefect.flow_run_ids", "")
        fr = clean_tags.get("prefect.flow_run_id")
        if fr and fr not in history.split(","):
            history = ",".join(x for x in (history, fr) if x)
        run_tags = {
            **clean_tags,
            **({"prefect.flow_run_ids": history} if history else {}),
            **({"lakehouse.params_changed": ",".join(changed)} if changed else {}),
        }
        tag_list = [RunTag(k, truncate(v, MAX_TAG_VALUE)) for k, v in run_tags.items()]
        for i in range(0, max(len(new), len(tag_list)), MAX_PARAMS_PER_BATCH):
            client.log_batch(
                run_id,
                params=new[i : i + MAX_PARAMS_PER_BATCH],
                tags=tag_list[i : i + MAX_PARAMS_PER_BATCH],
            )
        return run_id

    return with_retries(attempt, f"starting the MLflow run for {run_key}", uri, retry_for_s)


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment `name`, created (or restored) when needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # created concurrently


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store sit next to the database file; servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser().resolve()
    return (db.parent / "mlartifacts" / (slug(experiment) or "experiment")).as_uri()


def _run_filter(run_key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{run_key.replace(chr(39), chr(39) * 2)}'"


def _find_run(client, exp_id: str, run_key: str):
    """The oldest active run tagged with `run_key`, or None."""
    runs = client.search_runs(
        [exp_id], _run_filter(run_key), max_results=10, order_by=["attributes.start_time ASC"]
    )
    return runs[0] if runs else None


def _one_run_per_key(client, exp_id: str, run_key: str, created):
    """Two starts racing on one key: the oldest run wins and ours is deleted."""
    first = _find_run(client, exp_id, run_key)
    if first is not None and first.info.run_id != created.info.run_id:
        client.delete_run(created.info.run_id)
        return first
    return created


def close_if_logged(run_id: str, uri: str, *, token: str | None = None) -> bool:
    """When `finish_run` already logged this run's model, mark the run FINISHED and return
    True (a re-run of finished training); else False (the model still has to be logged)."""
    uri = configure_tracking(uri, token)

    def attempt() -> bool:
        client = mlflow_client(uri)
        run = client.get_run(run_id)
        if not run.data.tags.get(MODEL_ID_TAG):
            return False
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, "FINISHED")
        return True

    return with_retries(attempt, f"closing MLflow run {run_id}", uri)
