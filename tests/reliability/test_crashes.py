"""Crashes of the real servers and of the pipeline at the worst moment, then a re-run.

- Azurite itself SIGKILLed while bronze uploads data files and commits them to its Delta table,
  restarted on the same data folder.
- The training flow SIGKILLed after MLflow created the model version but before the flow heard
  back (no alias set yet): the re-run completes the registration, one version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tests.conftest import ROOT, Azurite, bronze_args, last_json, run_cli
from tests.fixtures.training import sample_texts, write_silver
from tests.integration.test_bronze_local import assert_exactly_once, make_rows
from tests.integration.test_train_resume import ARGS as RESUME_ARGS
from tests.reliability.conftest import block_through
from tests.reliability.proxy import TcpProxy
from tests.reliability.test_network import assert_batches_clean

pytestmark = pytest.mark.reliability

FAST_RETRIES = {"LAKEHOUSE_RETRY_DELAY_SCALE": "0.01"}
FILES, SAVED, ROWS = 6, 2, 3_000  # one data file and one commit per batch


def _popen(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture
def own_azurite(tmp_path):
    """An Azurite of this test alone (it gets killed), on its own data folder and port."""
    server = Azurite(tmp_path / "azurite-data")
    server.start()
    yield server
    server.kill()


def test_azurite_killed_mid_upload_then_restarted(
    own_azurite, prefect_harness, jsonl_factory, tmp_path
):
    container = f"crash-{uuid.uuid4().hex[:8]}"
    own_azurite.create_container(container)
    block = f"lh-{container}"
    block_through(own_azurite.port, container, block)
    open_lakehouse.cache_clear()
    root = f"az://{container}/demo"
    args = bronze_args(root, tmp_path / "in" / "*.jsonl", block)
    lake = open_lakehouse(root, block)
    table = bronze_dir("json", "xx")
    texts: list[str] = []

    def land(first: int, count: int) -> None:
        for i in range(first, first + count):
            rows = make_rows(ROWS, f"az-crash{i}-{uuid.uuid4().hex[:6]}")
            jsonl_factory(f"in/f{i}.jsonl", rows)
            texts.extend(r["text"] for r in rows)

    def commits() -> int:
        try:
            found = lake.find(f"{table}/_delta_log")
        except Exception:  # noqa: BLE001 - listing while Azurite works
            return 0
        return sum(p.endswith(".json") and "/_delta_log/0" in p for p in found)

    # Committed data first, on Azurite's disk before the crash (it saves its metadata every
    # 5 s; Azure Storage is durable when it answers, Azurite is not).
    land(0, SAVED)
    first = run_cli(*args, env=FAST_RETRIES)
    assert first.returncode == 0, first.stderr[-3000:]
    log = {f"demo/{p}" for p in lake.find(f"{table}/_delta_log") if p.endswith(".json")}
    assert log, "no commit in the table's log"
    deadline = time.monotonic() + 120
    while not log <= own_azurite.saved_blobs(container):
        assert time.monotonic() < deadline, "Azurite did not save the first commits to disk"
        time.sleep(0.5)
    saved_commits = commits()
    # The log also holds the table's creation (one per writer that raced to create it).
    assert saved_commits >= SAVED and len(committed_batches(lake, table)) == SAVED

    # More files; Azurite dies after the run's first new commit, before its last one.
    land(SAVED, FILES - SAVED)
    proc = _popen(args, FAST_RETRIES)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and commits() < saved_commits + 1:
            time.sleep(0.05)
        assert proc.poll() is None, "bronze finished before Azurite could be killed"
        at_kill = commits() - saved_commits
        assert 1 <= at_kill < FILES - SAVED, at_kill  # the kill lands mid-run
        own_azurite.kill()  # SIGKILL: the storage server dies, the writer talks to nobody
        killed_at = time.time()
        out, _ = proc.communicate(timeout=300)
    finally:
        _kill(proc)
    assert proc.returncode != 0, out.decode()[-3000:]
    seconds_to_fail = time.time() - killed_at

    own_azurite.start()  # the same data folder: what Azurite had saved is back
    open_lakehouse.cache_clear()
    lake = open_lakehouse(root, block)
    before = committed_batches(lake, table)
    kept = len(before)
    assert kept >= SAVED, "batches committed (and saved) before the crash are gone"
    assert [b.rows for b in before] == [ROWS] * kept  # whole batches only
    rerun = run_cli(*args, env=FAST_RETRIES)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # The re-run commits exactly what was not committed: nothing twice, nothing lost.
    assert last_json(rerun.stdout)["rows"] == len(texts) - ROWS * kept
    after = committed_batches(lake, table)
    assert [b.rows for b in after] == [ROWS] * FILES
    assert {b.batch_id: b.version for b in after if b.batch_id in {x.batch_id for x in before}} == {
        b.batch_id: b.version for b in before
    }  # what survived the crash kept its commit; the re-run only added
    assert_exactly_once(lake, texts)
    assert_batches_clean(lake, table)
    assert last_json(run_cli(*args).stdout)["rows"] == 0  # and then nothing is new
    print(
        f"reliability: fault=azurite_sigkill commits_at_kill={at_kill} "
        f"batches_kept={kept}/{FILES} writer_failed_after_s={seconds_to_fail:.1f} "
        f"rerun_rows={last_json(rerun.stdout)['rows']} rows={len(texts)} lost=0 duplicates=0"
    )


# The resume test's small settings, 10 steps (later --set wins).
TRAIN_ARGS = [*RESUME_ARGS, "--set", "train.max_steps=10", "--set", "train.eval_steps=10"]


def test_killed_mid_registration_then_rerun_registers_once(
    mlflow_server, prefect_harness, tiny_models, tmp_path
):
    from mlflow import MlflowClient

    root = tmp_path / "lake"
    write_silver(str(root), tiny_models["t5"], sample_texts(per_language=20))
    name = f"crash-reg-{uuid.uuid4().hex[:6]}"
    proxy = TcpProxy(mlflow_server.port)
    cmd = [
        "flows",
        "train",
        "--json",
        "--set",
        f"lakehouse.root={root}",
        "--set",
        f"model.name_or_path={tiny_models['t5']}",
        "--set",
        f"tracking.uri=http://127.0.0.1:{proxy.port}",
        "--set",
        f"tracking.registered_model={name}",
        "--set",
        f"tracking.experiment={name}",
        *TRAIN_ARGS,
    ]
    env = {"LAKEHOUSE_WORK_DIR": str(tmp_path / "work")}
    proc = None
    killed = []

    def kill_the_flow() -> None:
        # MLflow has created the version; the flow dies before it hears so.
        os.killpg(proc.pid, signal.SIGKILL)
        killed.append(time.time())

    proxy.on_response_to(b"/mlflow/model-versions/create", kill_the_flow, method=b"POST")
    try:
        proc = _popen(cmd, env)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc is not None:
            _kill(proc)
    assert killed and proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    [created] = client.search_model_versions(f"name = '{name}'")
    assert created.aliases == []  # killed between the server's commit and the aliases
    history = {
        k: len(client.get_metric_history(created.run_id, k))
        for k in client.get_run(created.run_id).data.metrics
    }

    rerun = subprocess.run(
        [sys.executable, "-m", *cmd],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    proxy.close()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = last_json(rerun.stdout)
    assert result["global_step"] == 10 and result["message"].startswith("already trained")
    assert (result["model_name"], result["model_version"]) == (name, created.version)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [created.version]
    assert client.get_model_version_by_alias(name, "candidate").version == created.version
    assert client.get_model_version_by_alias(name, "champion").version == created.version
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert created.run_id == run.info.run_id
    # Nothing logged twice by the re-run.
    assert history and history == {
        k: len(client.get_metric_history(run.info.run_id, k)) for k in history
    }
    print(
        f"reliability: fault=killed_mid_registration versions={len(versions)} "
        f"aliases=candidate,champion run_status={run.info.status} step={result['global_step']}"
    )
