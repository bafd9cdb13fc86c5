"""Prefect tasks of the parent pipeline: the summary artifact, and where training runs.

Where the training subflow runs: in process, or as a deployment run on a work pool.

`train.infra`:
  inline      the parent calls train_flow itself (same process);
  docker-gpu  run_deployment("train/train-gpu") on the docker-gpu pool (NVIDIA GPUs);
  docker-cpu  run_deployment("train/train-cpu") on the docker-cpu pool;
  process     run_deployment("train/train-process") on the process pool (hosts without Docker);
  auto        the first of docker-gpu, docker-cpu, process with a live worker (train.device=cpu
              skips the GPU pool, train.device=gpu considers only it), else inline.
The child's TrainResult comes back through Prefect result persistence (the server's default
result storage, set by `make deploy`), so the parent reads exactly what the child returned.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.errors import UserError
from tasks.pipeline.summary import summary_markdown
from tasks.report import artifact_key

log = logging.getLogger(__name__)

DEPLOYMENTS = {
    "docker-gpu": "train/train-gpu",
    "docker-cpu": "train/train-cpu",
    "process": "train/train-process",
}
POOLS = {"docker-gpu": "docker-gpu", "docker-cpu": "docker-cpu", "process": "process"}
# A worker is live when its last heartbeat is recent (Prefect marks it offline later).
LIVE_AFTER_MISSED_HEARTBEATS = 3
DEFAULT_HEARTBEAT_SECONDS = 30


class InfraError(UserError, RuntimeError):
    """The training infrastructure could not run or return the training subflow."""


def live_workers(pool: str, now: dt.datetime | None = None) -> list[str]:
    """Names of the workers of `pool` with a recent heartbeat; empty when the pool is missing."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    now = now or dt.datetime.now(dt.UTC)
    try:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool(pool)
    except ObjectNotFound:
        return []
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 404:  # no such pool
            return []
        raise
    live = []
    for w in workers:
        interval = w.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS
        beat = w.last_heartbeat_time
        recent = beat is not None and (now - beat).total_seconds() <= (
            interval * LIVE_AFTER_MISSED_HEARTBEATS
        )
        if str(getattr(w.status, "value", w.status)).upper() == "ONLINE" and recent:
            live.append(w.name)
    return live


def choose_infra(infra: str, device: str) -> tuple[str, str]:
    """Resolve `train.infra` (auto included) to a concrete one, with the reason."""
    if infra != "auto":
        return infra, f"train.infra={infra}"
    # device=gpu never falls back to a CPU pool: inline then uses this host's GPU (or says
    # clearly that there is none); device=cpu never takes a GPU worker.
    candidates = {"cpu": ["docker-cpu", "process"], "gpu": ["docker-gpu"]}.get(
        device, ["docker-gpu", "docker-cpu", "process"]
    )
    for option in candidates:
        workers = live_workers(POOLS[option])
        if workers:
            return option, f"train.infra=auto: pool {POOLS[option]} has live worker(s) {workers}"
    return "inline", f"train.infra=auto: no live worker in {candidates}; training in process"


def portable_params(params: dict[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """Make relative local paths absolute, so a run elsewhere on this host finds the same data.

    A process worker starts flows in the project folder, a container in /opt/app; with
    absolute paths (and the docker pools mounting the project folder at the same path) both
    see the lakehouse, the model folder and the MLflow store the parent uses.
    """
    cwd = cwd or Path.cwd()
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}

    def absolute(value: str | None) -> str | None:
        if not value or "://" in value or Path(value).is_absolute():
            return value
        return str((cwd / value).resolve())

    lake = out.get("lakehouse", {})
    lake["root"] = absolute(lake.get("root"))
    model = out.get("model", {})
    name = model.get("name_or_path")
    if name and (name.startswith((".", "/", "~")) or (cwd / name).exists()):
        model["name_or_path"] = absolute(str(Path(name).expanduser()))
    train = out.get("train", {})
    train["output_dir"] = absolute(train.get("output_dir"))
    tracking = out.get("tracking", {})
    uri = tracking.get("uri") or ""
    m = re.match(r"^sqlite:///(?!/)(.+)$", uri)
    if m:  # sqlite:///rel.db is relative to the cwd; sqlite:////abs.db is absolute
        tracking["uri"] = f"sqlite:///{(cwd / m.group(1)).resolve()}"
    elif uri and "://" not in uri and not Path(uri).is_absolute():
        tracking["uri"] = absolute(uri)
    elif uri.startswith("file:") and not uri.startswith("file:///"):
        tracking["uri"] = "file://" + str((cwd / uri[len("file:") :].lstrip("/")).resolve())
    return out


def run_training_deployment(
    infra: str,
    params: dict[str, Any],
    idempotency_key: str | None = None,
    job_variables: dict[str, Any] | None = None,
) -> Any:
    """Run the train deployment for `infra` as a subflow, wait, and return its result."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import MissingResult

    name = DEPLOYMENTS[infra]
    if not live_workers(POOLS[infra]):
        log.warning(
            "no live worker in pool %s: %s waits until one starts "
            "(`prefect worker start --pool %s`)",
            POOLS[infra],
            name,
            POOLS[infra],
        )
    try:
        flow_run = run_deployment(
            name=name,
            parameters={"params": portable_params(params)},
            as_subflow=True,
            timeout=None,
            idempotency_key=idempotency_key,
            job_variables=job_variables,
        )
    except Exception as exc:
        if "not found" in str(exc).lower() or type(exc).__name__ == "ObjectNotFound":
            raise InfraError(
                f"train.infra={infra}: deployment {name!r} does not exist on this Prefect API; "
                "run `make deploy` (or set train.infra=inline)"
            ) from None
        raise
    state = flow_run.state
    if state is None or not state.is_completed():
        raise InfraError(
            f"training run {flow_run.name} ({name}) ended {state.name if state else 'unknown'}"
            f": {state.message if state else ''}. See its logs in the UI."
        )
    try:
        return state.result()
    except MissingResult:
        raise InfraError(
            f"training run {flow_run.name} ({name}) completed but its result was not persisted: "
            "set a default result storage both workers can read (`make deploy` does) or "
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT=true in the pool's environment."
        ) from None


@task(name="publish-pipeline-summary")
def publish_summary(
    *,
    dataset_key: str,
    language: str,
    bronze: dict[str, Any],
    silver: dict[str, Any],
    train: dict[str, Any] | None,
    skipped_train: str | None,
    infra: str | None,
    tracking_uri: str,
) -> str:
    """Create the run's markdown artifact; returns the markdown."""
    markdown = summary_markdown(bronze, silver, train, skipped_train, infra, tracking_uri)
    create_markdown_artifact(
        key=artifact_key("pipeline", dataset_key, language),
        markdown=markdown,
        description="Rows per layer, rejects by reason, MLflow run and model version",
    )
    return markdown
