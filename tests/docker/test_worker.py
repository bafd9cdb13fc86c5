"""The project image doing real work: flows in a container, and a Prefect Docker worker.

1. `python -m flows bronze` / `silver` in the image on a mounted lakehouse folder commit the
   same rows (bronze `_row_id`s, silver `_row_id`s and `input_ids`) as the same flows on the host.
2. The parent pipeline flow (in this process, against a real `prefect server`) starts
   `train/train-cpu` with run_deployment(as_subflow=True) (train.infra=docker-cpu); a
   `prefect worker start --pool docker-cpu --type docker` worker runs it in the image, the model
   is registered in MLflow (SQLite store in the mounted folder) and the parent completes with
   the child's TrainResult.

The docker-gpu pool's NVIDIA device request is checked in tests/integration/test_pools.py, the
non-root user and the absence of secrets in the image in tests/docker/test_image.py.

Both sides share folders under <repo>/.work/docker-tests: prefect.yaml mounts the project
folder at the same path in the training container, and the image runs as uid 10001, so this
(possibly root) test process creates everything group/world-writable (umask 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import last_json
from tests.docker.test_image import APP_UID, DEFAULT_SOCKET, engine, image  # noqa: F401
from tests.fixtures.prefect_server import PrefectServer, Worker

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "culturax"
LANG = "fr"
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


@contextlib.contextmanager
def shared_umask() -> Iterator[None]:
    """Files made here stay writable for the container's uid 10001 (and the other way round)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A folder inside the project (mounted at the same path in the training container)."""
    path = ROOT / ".work" / "docker-tests" / uuid.uuid4().hex[:10]
    path.mkdir(parents=True)
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def input_file(workdir) -> Path:
    """120 French sample rows plus 20 repeated ones (so silver rejects duplicates)."""
    with open(SAMPLE / f"{LANG}.jsonl", encoding="utf-8") as fh:
        lines = fh.readlines()[:120]
    path = workdir / "input" / f"{LANG}.jsonl"
    with shared_umask():
        path.parent.mkdir(mode=0o777)
        path.write_text("".join(lines + lines[:20]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(workdir, tiny_models) -> Path:
    """The tiny T5, readable by the container's user (the builder leaves the weights 0600)."""
    dst = workdir / "tiny-t5"
    with shared_umask():
        shutil.copytree(tiny_models["t5"], dst, copy_function=shutil.copyfile)
    return dst


def flow_overrides(lake: Path, data: Path, model: Path) -> list[str]:
    return [
        f"lakehouse.root={lake}",
        "source.dataset=json",
        f"source.data_files={data}",
        f"source.language={LANG}",
        f"model.name_or_path={model}",
        "transform.spark_master=local[1]",
    ]


def committed_rows(lake: Path) -> dict[str, dict[str, list[int] | None]]:
    """Every Delta table of the lakehouse (bronze, silver, rejected), latest version:
    _row_id -> input_ids (None where the table has none), each batch's rows exactly once."""
    from tasks.lakehouse.batches import committed_batches
    from tasks.lakehouse.delta import read_version
    from tasks.lakehouse.storage import open_lakehouse

    open_lakehouse.cache_clear()
    lh = open_lakehouse(str(lake))
    tables = sorted({p.parent.relative_to(lake).as_posix() for p in lake.glob("**/_delta_log")})
    out: dict[str, dict[str, list[int] | None]] = {}
    for table in tables:
        data = read_version(lh.table_uri(table), storage_options={}).to_pylist()
        rows = {r["_row_id"]: r.get("input_ids") for r in data}
        assert len(rows) == len(data), f"{table}: duplicate _row_id"
        assert sum(b.rows for b in committed_batches(lh, table)) == len(data), table
        out[table] = rows
    open_lakehouse.cache_clear()
    return out


def test_bronze_and_silver_in_the_image_match_the_host(
    engine,
    image,
    prefect_server,  # noqa: F811
    model,
    workdir,
    input_file,
):
    from flows.bronze import bronze_flow
    from flows.params import load_params
    from flows.silver import silver_flow

    host_lake, box_lake = workdir / "host-lake", workdir / "container-lake"
    params = load_params(None, flow_overrides(host_lake, input_file, model))
    started = time.monotonic()
    with prefect_server.as_current():
        host_bronze = bronze_flow(params=params)
        host_silver = silver_flow(params=params)
    print(f"host bronze+silver: {time.monotonic() - started:.1f}s")
    assert host_bronze.rows == 140 and host_silver.batch_ids
    assert host_silver.rejected.get("duplicate", 0) >= 20

    # The container's flows report to the same Prefect server (host network: it listens on
    # 127.0.0.1). Without one the CLI starts a temporary server in the container, which on a
    # loaded 2-core machine can miss Prefect's 30 s start-up timeout.
    sets = " ".join(f"--set '{o}'" for o in flow_overrides(box_lake, input_file, model))
    out_dir = workdir / "container-out"
    with shared_umask():
        out_dir.mkdir(mode=0o777)
    # stdout (the --json result) to files: the ephemeral server logs to the same streams.
    script = (
        f"python -m flows bronze {sets} --json > {out_dir}/bronze.json && "
        f"python -m flows silver {sets} --json > {out_dir}/silver.json"
    )
    started = time.monotonic()
    try:
        engine.containers.run(
            image.id,
            ["sh", "-c", script],
            remove=True,
            stdout=True,
            stderr=True,
            network_mode="host",
            environment={"HF_HUB_OFFLINE": "1", "PREFECT_API_URL": prefect_server.api_url},
            volumes={str(workdir): {"bind": str(workdir), "mode": "rw"}},
        )
    except Exception as exc:  # ContainerError carries the container's stderr
        pytest.fail(f"flows in the container failed: {exc}")
    elapsed = time.monotonic() - started
    box_bronze = last_json((out_dir / "bronze.json").read_text())
    box_silver = last_json((out_dir / "silver.json").read_text())
    print(f"container bronze+silver: {elapsed:.1f}s")

    assert box_bronze["rows"] == host_bronze.rows
    assert box_silver["rows"] == host_silver.rows
    assert box_silver["rejected"] == host_silver.rejected
    # Files written in the container belong to its non-root user.
    assert (box_lake / "bronze").stat().st_uid == APP_UID

    host, box = committed_rows(host_lake), committed_rows(box_lake)
    assert set(host) == set(box) and any(t.startswith("silver/") for t in host), sorted(host)
    for table in host:
        assert host[table] == box[table], f"{table}: container rows differ from the host's"
    bronze_table = f"bronze/json/{LANG}"
    assert len(box[bronze_table]) == 140


def deploy_train_cpu(server: PrefectServer, workdir: Path) -> None:
    """`python -m deployments.deploy` for train-cpu: pools, blocks, result storage, prefect.yaml."""
    # The result storage folder: the container's flow run writes its TrainResult there.
    with shared_umask():
        (workdir / "results").mkdir(mode=0o777)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.deploy",
            "--name",
            "train-cpu",
            "--build",
            "no",
            "--results-dir",
            str(workdir / "results"),
        ],
        cwd=ROOT,
        env=server.client_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def wait_for_worker(server: PrefectServer, worker: Worker, pool: str, timeout: float = 120):
    from tasks.pipeline.tasks import live_workers

    deadline = time.monotonic() + timeout
    with server.as_current():
        while time.monotonic() < deadline:
            if live_workers(pool):
                return
            assert worker.proc is not None and worker.proc.poll() is None, worker.log()
            time.sleep(1)
    raise AssertionError(f"no live worker in {pool} after {timeout}s:\n{worker.log()}")


def container_states(server: PrefectServer, container_id: str, flow_run_id: str) -> list[str]:
    """The states a Docker worker announced for this container running this flow run
    (`prefect.docker.container.<state>` events), once `created` is among them (or 120 s).
    Later states are best effort: an auto-removed container may be gone before the worker
    looks again."""
    import httpx

    query = {
        "filter": {
            "event": {"prefix": ["prefect.docker.container."]},
            "resource": {"id": [f"prefect.docker.container.{container_id}"]},
            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        },
        "limit": 50,
    }
    deadline, states = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        resp = httpx.post(f"{server.api_url}/events/filter", json=query, timeout=10)
        resp.raise_for_status()
        states = [e["event"].rsplit(".", 1)[-1] for e in resp.json()["events"]]
        if "created" in states:
            break
        time.sleep(2)
    return states


def test_docker_worker_trains_a_pipeline_subflow(
    engine,
    image,
    prefect_server,  # noqa: F811
    model,
    workdir,
    input_file,
    tmp_path,
):
    from mlflow.tracking import MlflowClient
    from prefect import get_client

    from flows.params import load_params
    from flows.pipeline import pipeline_flow
    from tasks.pipeline.tasks import DEPLOYMENTS

    deploy_train_cpu(prefect_server, workdir)
    with prefect_server.as_current(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENTS["docker-cpu"])
        pool = client.read_work_pool("docker-cpu")
    assert deployment.work_pool_name == "docker-cpu"
    # Flows run from the image's code; the project is mounted at its own path.
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/app"}}
    ]
    assert deployment.job_variables == {"volumes": [f"{ROOT}:{ROOT}"]}
    assert pool.base_job_template["variables"]["properties"]["image"]["default"] == (
        "localhost/lakehouse-seq2seq:latest"
    )

    socket = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    worker = Worker(
        prefect_server,
        "docker-cpu",
        "docker",
        tmp_path / "worker.log",
        env={"DOCKER_HOST": socket, "PREFECT_WORKER_QUERY_SECONDS": "2"},
    )
    worker.start()
    try:
        wait_for_worker(prefect_server, worker, "docker-cpu")
        lake, db = workdir / "pipeline-lake", workdir / "mlflow" / "mlflow.db"
        tracking_uri = f"sqlite:///{db}"
        overrides = flow_overrides(lake, input_file, model) + [
            "source.max_rows=80",
            "train.on_partial=true",  # the budget leaves the file partial: train anyway
            "train.infra=docker-cpu",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.save_steps=2",
            "train.eval_steps=2",
            "train.max_eval_samples=8",
            f"tracking.uri={tracking_uri}",
            "tracking.experiment=docker-worker",
            "tracking.registered_model=docker-tiny-t5",
        ]
        params = load_params(None, overrides)
        with shared_umask():
            db.parent.mkdir(mode=0o777)
            started = time.monotonic()
            with prefect_server.as_current():
                state = pipeline_flow(params=params, return_state=True)
            elapsed = time.monotonic() - started
        print(f"pipeline with docker-cpu training: {elapsed:.1f}s")
        assert state.is_completed(), f"{state}\n--- worker ---\n{worker.log()}"
        with prefect_server.as_current():
            result = state.result()
    finally:
        worker.stop()

    assert result.bronze.rows == 80 and result.silver.batch_ids
    train = result.train
    assert train is not None and train.global_step == 2 and train.model_version == "1"

    # The training ran as the train-cpu deployment, as a subflow of the pipeline, in a
    # container of the image (the worker's log names the container it created).
    with prefect_server.as_current(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    (child,) = [r for r in runs if r.deployment_id == deployment.id]
    assert child.state.is_completed() and child.parent_task_run_id is not None
    # What only a container gives: the worker recorded `<engine API URL>:<container id>` (a
    # process worker records `<hostname>:<pid>`) and announced creating that container for this
    # flow run; the files the run wrote (below) belong to the image's uid, not to this user.
    assert child.infrastructure_pid, child
    engine_url, container_id = child.infrastructure_pid.rsplit(":", 1)
    assert engine_url == engine.api.base_url, child.infrastructure_pid
    assert re.fullmatch(r"[0-9a-f]{64}", container_id), child.infrastructure_pid
    states = container_states(prefect_server, container_id, str(child.id))
    assert "created" in states, f"{states}\n{worker.log()}"
    assert os.getuid() != APP_UID  # or the ownership check below proves nothing

    version = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(
        "docker-tiny-t5", "1"
    )
    assert version.run_id == train.mlflow_run_id
    # The checkpoint was written by the container's non-root user into the shared lakehouse.
    checkpoint = Path(train.checkpoint_uri.removeprefix("file://"))
    assert checkpoint.exists(), train.checkpoint_uri
    assert any(p.stat().st_uid == APP_UID for p in checkpoint.rglob("*")), checkpoint
