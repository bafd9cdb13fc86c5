"""End to end against a real Prefect server with a process worker, as a user runs it.

`python -m deployments.deploy` (pools, blocks, result storage, every deployment of prefect.yaml),
`prefect deployment run pipeline/pipeline` to completion (training through the train-process
deployment), then a file dropped into the landing zone -> `watch` -> the pipeline trigger -> a
pipeline run that ingests exactly that file. The Prefect server on SQLite in `make test`; on
PostgreSQL (127.0.0.1:5432) in `make ci-extra` (marker `ci`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.postgres import no_postgres
from tests.fixtures.prefect_server import (
    PrefectServer,
    Worker,
    drop_postgres_database,
    postgres_database,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "culturax"
pytestmark = pytest.mark.timeout(1200)


@dataclass
class Stack:
    server: PrefectServer
    worker: Worker
    lake: Path
    tracking_uri: str
    tmp: Path

    def cli(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """A command of this venv (`prefect ...`, `python -m ...`) against the server."""
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=self.server.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def diagnostics(self) -> str:
        return (
            f"--- worker log ---\n{self.worker.log()}\n--- server log ---\n{self.server.log(2000)}"
        )


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.ci)])
def stack(request, tmp_path_factory, tiny_models, mlflow_server):
    """Server (SQLite or PostgreSQL), deployments from prefect.yaml, and a process worker."""
    tmp = tmp_path_factory.mktemp(f"e2e-{request.param}")
    db_url = None
    if request.param == "postgres":
        db_url = postgres_database()
        if db_url is None:
            no_postgres("no PostgreSQL on 127.0.0.1:5432")
    server = PrefectServer(tmp / "server", database_url=db_url)
    server.start()
    # Runs land in a real MLflow server, as they do in the stack of `make server`.
    lake, tracking_uri = tmp / "lake", mlflow_server.uri
    overrides = [
        f"lakehouse.root={lake}",
        f"source.data_files={SAMPLE / 'fr.jsonl'}",
        "source.max_rows=120",
        "train.on_partial=true",  # the budget leaves fr.jsonl partial: train on it anyway
        f"model.name_or_path={tiny_models['t5']}",
        "transform.spark_master=local[1]",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.save_steps=2",
        "train.eval_steps=2",
        "train.max_eval_samples=8",
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=e2e",
        f"tracking.registered_model=e2e-tiny-t5-{request.param}",
    ]
    worker = None
    try:
        s = Stack(server, None, lake, tracking_uri, tmp)  # type: ignore[arg-type]
        deploy = s.cli(
            "deployments.deploy",
            "--build",
            "no",
            "--results-dir",
            str(tmp / "results"),
            *[a for o in overrides for a in ("--set", o)],
            timeout=600,
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        from prefect import get_client

        with server.as_current(), get_client(sync_client=True) as client:
            for name in (
                "pipeline/pipeline",
                "bronze/bronze",
                "silver/silver",
                "train/train-cpu",
                "train/train-gpu",
                "train/train-process",
                "watch/watch",
                "maintain/maintain",
            ):
                client.read_deployment_by_name(name)  # raises when missing
            gpu = client.read_deployment_by_name("train/train-gpu")
            # No image was built: the pool's default image; the project mounted at its path.
            assert gpu.job_variables == {"volumes": [f"{ROOT}:{ROOT}"]}, gpu.job_variables
            pool = client.read_work_pool("docker-gpu")
            request = pool.base_job_template["job_configuration"]["container_create_kwargs"]
            assert request["device_requests"][0]["capabilities"] == [["gpu"]]
        worker = Worker(
            server,
            "process",
            "process",
            tmp / "worker.log",
            env={"PREFECT_WORKER_QUERY_SECONDS": "2"},
        )
        worker.start()
        s.worker = worker
        yield s
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        if db_url:
            drop_postgres_database(db_url)


def flow_runs(server: PrefectServer, deployment: str) -> list:
    """Flow runs of a deployment (flow/deployment), newest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    flow_name, name = deployment.split("/")
    with server.as_current(), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            sort=FlowRunSort.START_TIME_DESC,
        )


def result_of(server: PrefectServer, run):
    with server.as_current():
        return run.state.result()


# What Python's `dis` prints (datasets' dill hashing of a lambda did, into a log_prints run).
BYTECODE = re.compile(r"Disassembly of <code object|\b(LOAD_FAST|LOAD_GLOBAL|RETURN_VALUE)\b")


def run_logs(server: PrefectServer, flow_run_ids: list, until: str, timeout: float = 120) -> list:
    """Every log message of these flow runs (their task runs' included), once `until` is in."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))
    deadline = time.monotonic() + timeout
    with server.as_current(), get_client(sync_client=True) as client:
        while True:
            messages: list[str] = []
            while batch := client.read_logs(log_filter, limit=200, offset=len(messages)):
                messages += [log.message for log in batch]
            # Flow-run processes send their logs in batches: wait for the last expected line.
            if any(until in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(2)


def test_deploy_and_run_pipeline_from_cli(stack):
    from mlflow.tracking import MlflowClient

    before = {r.id for r in flow_runs(stack.server, "pipeline/pipeline")}
    run = stack.cli(
        "prefect",
        "deployment",
        "run",
        "pipeline/pipeline",
        "--param",
        'overrides=["train.infra=process"]',
        "--watch",
        "--watch-interval",
        "3",
        "--watch-timeout",
        "900",
    )
    # This test's own runs (the landing test may have run its pipeline before).
    (pipeline,) = [r for r in flow_runs(stack.server, "pipeline/pipeline") if r.id not in before]
    assert pipeline.state.is_completed(), (
        f"{pipeline.state}\n{run.stdout[-2000:]}\n{stack.diagnostics()}"
    )
    result = result_of(stack.server, pipeline)
    assert len(result.bronze.batch_ids) == 1 and result.bronze.rows == 120
    assert len(result.silver.batch_ids) == 1
    assert result.silver.parent_batch_ids == result.bronze.batch_ids
    assert result.silver.rows + sum(result.silver.rejected.values()) == result.bronze.rows
    assert result.train.global_step == 2 and result.train.model_version

    # Training ran as its own deployment run (train-process), as a subflow of the pipeline.
    (train,) = flow_runs(stack.server, "train/train-process")
    assert train.state.is_completed() and train.parent_task_run_id is not None
    # The logs a person reads in the UI: progress, no bytecode disassembly.
    logs = run_logs(stack.server, [pipeline.id, train.id], until="final model:")
    assert any("final model:" in m for m in logs), logs[-20:]
    noise = [m for m in logs if BYTECODE.search(m)]
    assert not noise, f"{len(noise)} disassembly lines in the run logs, e.g. {noise[:3]}"
    # The model version is in the MLflow server the deployment was made with.
    mlflow = MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)
    version = mlflow.get_model_version(result.train.model_name, result.train.model_version)
    assert version.run_id == result.train.mlflow_run_id
    assert mlflow.get_run(version.run_id).data.tags["prefect.flow_run_id"] == str(train.id)

    from prefect import get_client

    with stack.server.as_current(), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    summary = [
        a for a in artifacts if a.key == "pipeline-json-multi" and a.flow_run_id == pipeline.id
    ]
    assert summary and "Rejected rows by reason" in summary[0].data
    assert result.train.mlflow_run_id in summary[0].data


def test_landing_file_triggers_a_pipeline_for_that_file_only(stack):
    arrived = stack.lake / "landing" / "json" / "2026-01-01" / "arrived.jsonl"
    arrived.parent.mkdir(parents=True, exist_ok=True)
    with open(SAMPLE / "de.jsonl", encoding="utf-8") as src:
        arrived.write_text("".join(src.readlines()[:40]), encoding="utf-8")
    before = {r.id for r in flow_runs(stack.server, "pipeline/pipeline")}

    watch = stack.cli(
        "prefect",
        "deployment",
        "run",
        "watch/watch",
        "--watch",
        "--watch-interval",
        "2",
        "--watch-timeout",
        "300",
    )
    (watch_run, *_) = flow_runs(stack.server, "watch/watch")
    assert watch_run.state.is_completed(), f"{watch.stdout[-2000:]}\n{stack.diagnostics()}"
    assert result_of(stack.server, watch_run).announced == [str(arrived)]

    # The trigger creates the pipeline run; the worker runs it.
    deadline, triggered = time.monotonic() + 900, None
    while time.monotonic() < deadline:
        new = [r for r in flow_runs(stack.server, "pipeline/pipeline") if r.id not in before]
        if new and new[0].state.is_final():
            triggered = new[0]
            break
        time.sleep(3)
    assert triggered is not None, f"no triggered pipeline run finished\n{stack.diagnostics()}"
    assert triggered.parameters["data_files"] == [str(arrived)]
    assert triggered.state.is_completed(), f"{triggered.state}\n{stack.diagnostics()}"
    result = result_of(stack.server, triggered)
    assert len(result.bronze.batch_ids) == 1 and result.bronze.rows == 40
    from tasks.lakehouse.batches import committed_batches
    from tasks.lakehouse.storage import open_lakehouse

    batches = committed_batches(open_lakehouse(str(stack.lake)), "bronze/json/multi")
    [batch] = [b for b in batches if b.batch_id == result.bronze.batch_ids[0]]
    assert [uri for uri, _ in batch.sources] == [str(arrived)] and batch.rows == 40
    assert result.bronze.skipped_sources == []  # the sample file was not even looked at

    # Announced once: a second watch run finds nothing new and starts no pipeline.
    again = stack.cli(
        "prefect",
        "deployment",
        "run",
        "watch/watch",
        "--watch",
        "--watch-interval",
        "2",
        "--watch-timeout",
        "300",
    )
    latest = flow_runs(stack.server, "watch/watch")[0]
    assert latest.state.is_completed(), again.stdout[-2000:]
    assert result_of(stack.server, latest).announced == []
