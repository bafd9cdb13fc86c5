"""Bronze against Azure Blob (real Azurite) through the LakehouseStorage block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect_azure.credentials import AzureBlobStorageCredentials

from blocks.lakehouse import LakehouseStorage
from flows.params import load_params
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import latest_version, live_files, transaction_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import StorageError, open_lakehouse
from tests.conftest import AZURITE_ACCOUNT, ROOT, bronze_args, free_port, last_json, run_cli
from tests.integration.test_bronze_local import assert_exactly_once, make_rows
from tests.reliability.conftest import block_through
from tests.reliability.proxy import TcpProxy

FAST_RETRIES = {"LAKEHOUSE_RETRY_DELAY_SCALE": "0.01"}


def _cli_args(lh: dict, data_files, *extra: str) -> list[str]:
    return bronze_args(lh["root"], data_files, lh["block"], *extra)


def test_cli_ingests_through_block_exactly_once(azure_lakehouse, tmp_path, jsonl_factory):
    """The CLI subprocess loads the block from the same Prefect server (PREFECT_API_URL)."""
    lh = azure_lakehouse
    assert os.environ.get("PREFECT_API_URL"), "prefect_harness exports PREFECT_API_URL"
    a = make_rows(300, uuid.uuid4().hex)
    jsonl_factory("in/a.jsonl", a)
    glob = tmp_path / "in" / "*.jsonl"
    first = run_cli(*_cli_args(lh, glob), env=FAST_RETRIES)
    assert first.returncode == 0, first.stderr[-3000:]
    out = last_json(first.stdout)
    assert out["rows"] == 300 and out["uri"] == f"{lh['root']}/bronze/json/xx"
    lake = open_lakehouse(lh["root"], lh["block"])
    [m] = committed_batches(lake, bronze_dir("json", "xx"))
    assert (m.batch_id, m.rows, m.version) == (out["batch_ids"][0], 300, 1)  # v0: create
    assert [uri for uri, _ in m.sources] == [str((tmp_path / "in" / "a.jsonl").resolve())]

    b = make_rows(50, uuid.uuid4().hex)
    jsonl_factory("in/b.jsonl", b)
    second = last_json(run_cli(*_cli_args(lh, glob), env=FAST_RETRIES).stdout)
    assert second["rows"] == 50 and len(second["batch_ids"]) == 1
    assert second["skipped_sources"] == [str((tmp_path / "in" / "a.jsonl").resolve())]
    assert_exactly_once(lake, [r["text"] for r in a + b])
    assert [(x.rows, x.version) for x in committed_batches(lake, bronze_dir("json", "xx"))] == [
        (300, 1),
        (50, 2),
    ]

    # Re-run in-process (a CLI start costs seconds; the code path is the same flow).
    from flows.bronze import bronze_flow

    overrides = [x for x in _cli_args(lh, glob) if "=" in x]
    again = bronze_flow(params=load_params(overrides=overrides))
    assert again.rows == 0 and again.batch_ids == [] and again.message.startswith("nothing new")
    assert len(again.skipped_sources) == 2
    assert_exactly_once(lake, [r["text"] for r in a + b])
    uri = lake.table_uri(bronze_dir("json", "xx"))
    assert latest_version(uri, storage_options=lake.storage_options) == 2  # no empty commits


def test_landing_files_on_azure(azure_lakehouse, monkeypatch):
    """data_files may be az:// inside the lakehouse account (fingerprinted by etag)."""
    from flows.bronze import bronze_flow

    lh = azure_lakehouse
    lake = open_lakehouse(lh["root"], lh["block"])
    rows = make_rows(25, "landing")
    payload = "".join(f'{{"text": "{r["text"]}"}}\n' for r in rows).encode()
    lake.write_bytes("landing/json/day1.jsonl", payload)
    params = load_params(
        overrides=[
            "source.dataset=json",
            f"source.data_files={lh['root']}/landing/json/*.jsonl",
            "source.language=xx",
            f"lakehouse.root={lh['root']}",
            f"lakehouse.block={lh['block']}",
        ]
    )
    first = bronze_flow(params=params)
    assert first.rows == 25
    assert bronze_flow(params=params).rows == 0
    assert_exactly_once(lake, [r["text"] for r in rows])
    [batch] = committed_batches(lake, bronze_dir("json", "xx"))
    [(source, fingerprint)] = batch.sources
    assert source == f"{lh['root']}/landing/json/day1.jsonl" and fingerprint.startswith("etag:")


def _blobs(lake, table: str) -> tuple[list[str], list[str]]:
    """(data files, commit files) under a table folder, as blob paths."""
    found = lake.find(table)
    data = [p for p in found if p.endswith(".parquet")]
    commits = [p for p in found if "/_delta_log/" in p and p.endswith(".json")]
    return data, commits


def test_killed_mid_upload_leaves_no_commit_and_rerun_is_exactly_once(
    azure_lakehouse, azurite, tmp_path, jsonl_factory
):
    """The writer dies after uploading its data file, before its commit reaches the log."""
    lh = azure_lakehouse
    rows = make_rows(8_000, uuid.uuid4().hex)
    src = jsonl_factory("big.jsonl", rows)
    table = bronze_dir("json", "xx")
    # The writer reaches Azurite through a proxy that cuts the PUT of the data commit (log
    # version 1; version 0 only creates the table) before it is forwarded, and refuses
    # connections afterwards: the writer is killed while it waits, so the kill lands after
    # the upload and before any commit.
    proxy = TcpProxy(azurite.port)
    cut_block = f"{lh['block']}-cut"
    block_through(proxy.port, lh["container"], cut_block, azurite)
    proxy.cut_on(b"/_delta_log/00000000000000000001.json", seconds=600, method=b"PUT")
    lake = open_lakehouse(lh["root"], lh["block"])  # assertions go straight to Azurite
    uri = lake.table_uri(table)
    proc = subprocess.Popen(
        [sys.executable, "-m", *_cli_args(lh | {"block": cut_block}, src)],
        cwd=ROOT,
        env={**os.environ, **FAST_RETRIES},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and proxy.cuts == 0:
            time.sleep(0.05)
        cut_seen = proxy.cuts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proxy.close()
    assert cut_seen == 1, "the writer never tried to commit"
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    orphans, commits = _blobs(lake, table)
    assert orphans, "the killed writer had uploaded no data file"
    # Its files hold rows of this very source: a reader that took them would see those rows
    # twice. The re-run's table holds every row once (below), so they were never read.
    orphan_texts = [
        t for p in orphans for t in pq.read_table(pa.BufferReader(lake.read_bytes(p)))["text"]
    ]
    assert orphan_texts and {t.as_py() for t in orphan_texts} <= {r["text"] for r in rows}
    # The partial batch is not committed: the log holds only the table's creation.
    assert [c.rsplit("/", 1)[-1] for c in commits] == ["00000000000000000000.json"]
    assert latest_version(uri, storage_options=lake.storage_options) == 0
    assert committed_batches(lake, table) == []

    # Re-run in-process: same unit, same batch id (its application transaction), one commit.
    from flows.bronze import bronze_flow

    res = bronze_flow(params=load_params(overrides=[x for x in _cli_args(lh, src) if "=" in x]))
    assert res.rows == 8_000 and len(res.batch_ids) == 1
    [m] = committed_batches(lake, table)
    assert (m.batch_id, m.rows, m.version) == (res.batch_ids[0], 8_000, 1)
    assert transaction_version(uri, m.batch_id, storage_options=lake.storage_options) == 1
    live = live_files(uri, storage_options=lake.storage_options)
    names = {f.rsplit("/", 1)[-1] for f in live}
    assert names and not names & {p.rsplit("/", 1)[-1] for p in orphans}
    assert_exactly_once(lake, [r["text"] for r in rows])  # the orphans' rows are not read
    assert len(_blobs(lake, table)[1]) == 2  # the creation and one data commit
    again = bronze_flow(params=load_params(overrides=[x for x in _cli_args(lh, src) if "=" in x]))
    assert again.rows == 0 and latest_version(uri, storage_options=lake.storage_options) == 1


def _block(azurite, name: str, conn: str) -> dict:
    LakehouseStorage(
        credentials=AzureBlobStorageCredentials(connection_string=conn),
        container="lake-bad",
        prefix="demo",
        retry_total=0,
    ).save(name, overwrite=True)
    open_lakehouse.cache_clear()
    return {"root": "az://lake-bad/demo", "block": name}


def _run_flow(lh: dict, src):
    """Bronze in this process; its final state (`.result()` raises the run's error)."""
    from flows.bronze import bronze_flow

    return bronze_flow(
        params=load_params(
            overrides=[
                "source.dataset=json",
                f"source.data_files={src}",
                "source.language=xx",
                f"lakehouse.root={lh['root']}",
                f"lakehouse.block={lh['block']}",
            ]
        ),
        return_state=True,
    )


def _task_attempts(state) -> dict[str, int]:
    """How many times each task of the flow run ran (the server's record: 1 = no retry)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    return {r.name: r.run_count for r in runs}


def test_wrong_credentials(azurite, prefect_harness, jsonl_factory, monkeypatch):
    monkeypatch.setenv("LAKEHOUSE_RETRY_DELAY_SCALE", "0.01")
    azurite.create_container("lake-bad")
    wrong = azurite.connection_string.replace("AccountKey=", "AccountKey=AAAA")
    lh = _block(azurite, f"wrong-{uuid.uuid4().hex[:6]}", wrong)
    src = jsonl_factory("a.jsonl", make_rows(3, "k"))
    state = _run_flow(lh, src)
    with pytest.raises(StorageError) as err:
        state.result()
    msg = str(err.value)
    assert "refused the credentials" in msg and "AzureBlobStorageCredentials block" in msg
    assert "lakehouse.block" in msg and AZURITE_ACCOUNT not in msg.replace(lh["root"], "")
    assert "AAAA" not in msg
    # Wrong credentials are not retried: the failing task ran once.
    attempts = _task_attempts(state)
    assert attempts and max(attempts.values()) == 1, attempts


def test_unreachable_storage(azurite, prefect_harness, jsonl_factory, monkeypatch):
    monkeypatch.setenv("LAKEHOUSE_RETRY_DELAY_SCALE", "0.01")
    closed = free_port()
    conn = azurite.connection_string.replace(f":{azurite.port}/", f":{closed}/")
    lh = _block(azurite, f"closed-{uuid.uuid4().hex[:6]}", conn)
    src = jsonl_factory("a.jsonl", make_rows(3, "u"))
    state = _run_flow(lh, src)
    with pytest.raises(
        StorageError, match=r"az://lake-bad/demo/bronze/json/xx is unreachable.*endpoint"
    ):
        state.result()
    # An unreachable endpoint may come back: that one is retried.
    assert max(_task_attempts(state).values()) > 1


def test_missing_block_names_the_fix(prefect_harness, jsonl_factory):
    src = jsonl_factory("a.jsonl", make_rows(3, "m"))
    open_lakehouse.cache_clear()
    with pytest.raises(StorageError, match=r"lakehouse.block='no-such-block'.*blocks create"):
        _run_flow({"root": "az://c/p", "block": "no-such-block"}, src).result()
