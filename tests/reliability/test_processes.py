"""Faults between processes: two runs at once, a file arriving mid-run, a full disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest

from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import latest_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tests.conftest import ROOT, bronze_args, last_json, run_cli
from tests.integration.test_bronze_local import assert_exactly_once, make_rows
from tests.reliability.test_network import assert_batches_clean

pytestmark = pytest.mark.reliability
FAST = {"LAKEHOUSE_RETRY_DELAY_SCALE": "0.05"}


def popen_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **FAST, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _twice_at_once(
    root: str,
    block: str | None,
    read_block: str | None,
    tmp_path,
    jsonl_factory,
    require_overlap: bool = False,
) -> None:
    texts = []
    for i in range(4):
        rows = make_rows(150, f"twin{i}-{uuid.uuid4().hex[:6]}")
        jsonl_factory(f"in/t{i}.jsonl", rows)
        texts += [r["text"] for r in rows]
    args = bronze_args(root, tmp_path / "in" / "*.jsonl", block)
    started = datetime.now(UTC)
    procs = [popen_cli(args) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [last_json(out) for out, _ in outs]
    # The two flow runs were running at the same time (the server's record), or nothing raced.
    runs = bronze_runs(root, since=started)
    spans = [(r.start_time.isoformat(), r.end_time.isoformat()) for r in runs if r.end_time]
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs), spans
    overlap = min(r.end_time for r in runs) - max(r.start_time for r in runs)
    print(f"reliability: twin runs overlap={overlap.total_seconds():.1f}s spans={spans}")
    if require_overlap:  # both runs were working at the same time: they raced on the units
        assert overlap.total_seconds() > 0, spans
    lake = open_lakehouse(root, read_block)
    batches = committed_batches(lake, bronze_dir("json", "xx"))
    assert [b.rows for b in batches] == [150] * 4
    # Each unit was committed by exactly one of the runs; the other saw it (skip or lost race).
    committed = [b for r in results for b in r["batch_ids"]]
    assert sorted(committed) == sorted(b.batch_id for b in batches)
    assert sum(r["rows"] for r in results) == 600
    # Four commits, one per unit: a lost race made no commit of its own.
    uri = lake.table_uri(bronze_dir("json", "xx"))
    first = min(b.version for b in batches)  # may follow a table-creating version
    assert latest_version(uri, storage_options=lake.storage_options) == first + 3
    assert_exactly_once(lake, texts)
    assert_batches_clean(lake, bronze_dir("json", "xx"))
    print(
        f"reliability: fault=concurrent_bronze root={'az' if block else 'local'} runs=2 "
        f"commits={len(committed)} split={[len(r['batch_ids']) for r in results]} "
        f"skipped={[len(r['skipped_sources']) for r in results]} "
        "rows=600 rows_lost=0 duplicates=0"
    )


def bronze_runs(root: str, since: datetime) -> list:
    """The bronze flow runs on the test's Prefect server that started after `since` on `root`."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["bronze"])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
        )
    return [r for r in runs if r.parameters["params"]["lakehouse"]["root"] == root]


def test_same_bronze_twice_at_once_local(prefect_harness, tmp_path, jsonl_factory):
    _twice_at_once(str(tmp_path / "lake"), None, None, tmp_path, jsonl_factory)


def test_same_bronze_twice_at_once_azure(proxied_lakehouse, tmp_path, jsonl_factory):
    """Storage 20 ms away: each run takes seconds of requests, far longer than the start-up
    skew between the two processes, so their flow runs overlap (asserted) and race."""
    lh = proxied_lakehouse
    lh["proxy"].delay(0.02)
    _twice_at_once(
        lh["root"], lh["block"], lh["direct"], tmp_path, jsonl_factory, require_overlap=True
    )


def _limit_file_size(limit: int):
    def apply() -> None:
        # Ignore SIGXFSZ so an over-limit write fails with EFBIG (as on a full disk) instead
        # of killing the process outright.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_mid_part_then_rerun(prefect_harness, tmp_path):
    root = tmp_path / "lake"
    src = tmp_path / "in" / "big.jsonl"
    src.parent.mkdir(parents=True)
    # Incompressible text: the data file outgrows the 256 KiB limit mid-write.
    with open(src, "w") as fh:
        for i in range(3000):
            fh.write(json.dumps({"text": f"{i} {os.urandom(300).hex()}"}) + "\n")
    args = bronze_args(str(root), src, None)
    env = {**os.environ, **FAST, "LAKEHOUSE_WORK_DIR": str(tmp_path / "work")}
    started = time.monotonic()
    limited = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(256 << 10),
    )
    took = time.monotonic() - started
    # A user error (exit 2) with one plain last line; no retries of a fault that won't heal.
    assert limited.returncode == 2, limited.stderr[-3000:]
    last = limited.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk full / file size limit" in last, last
    assert "big.jsonl" in last and "LAKEHOUSE_WORK_DIR" in last
    lake = open_lakehouse(str(root))
    uri = lake.table_uri(bronze_dir("json", "xx"))
    assert committed_batches(lake, bronze_dir("json", "xx")) == []
    # At most the table's creation (version 0, no data): no data commit.
    assert latest_version(uri, storage_options={}) in (None, 0)
    again = run_cli(*args, env={**FAST, "LAKEHOUSE_WORK_DIR": str(tmp_path / "work")})
    assert again.returncode == 0, again.stderr[-3000:]
    out = last_json(again.stdout)
    assert out["rows"] == 3000 and len(out["batch_ids"]) == 1
    [m] = committed_batches(lake, bronze_dir("json", "xx"))
    assert (m.batch_id, m.rows, m.version) == (out["batch_ids"][0], 3000, 1)  # v0: create
    assert_batches_clean(lake, bronze_dir("json", "xx"))
    print(
        f"reliability: fault=file_size_limit exit={limited.returncode} failed_in={took:.1f}s "
        "commits_while_full=0 rerun_commits=1 rows_lost=0"
    )
