"""Network faults between the real bronze flow and real Azurite, injected by a TCP proxy."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import BATCH_META, open_table, transaction_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tests.conftest import bronze_args, last_json, run_cli
from tests.integration.test_bronze_local import assert_exactly_once, make_rows

pytestmark = pytest.mark.reliability


def _bronze(lh: dict, data_files, **extra) -> SimpleNamespace:
    """The bronze CLI in its own process; the result, and its output as `log`.

    Not in-process: delta-rs holds the GIL during some network calls (the history read after a
    lost reply), and the proxy's threads live in this process, so they would wait on each other.
    """
    args = bronze_args(lh["root"], data_files, lh["block"])
    args += [a for k, v in extra.items() for a in ("--set", f"{k}={v}")]
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(**last_json(proc.stdout), log=proc.stdout + proc.stderr)


def assert_batches_clean(lake, table: str) -> None:
    """One commit per batch, adding exactly that batch's rows; no other commit in the log.

    A retried or partial attempt that reached the log would show as a second commit of a batch
    id, a commit without one, or a commit whose added rows differ from the batch's rows.
    """
    uri, opts = lake.table_uri(table), lake.storage_options
    batches = committed_batches(lake, table)
    history = {int(h["version"]): h for h in open_table(uri, storage_options=opts).history()}
    writes = sorted(v for v, h in history.items() if h["operation"] == "WRITE")
    # Besides one WRITE per batch, only the table's creation (writers racing to create it
    # may each record one); never a second write of a batch or a write without one.
    others = {h["operation"] for v, h in history.items() if v not in writes}
    assert others <= {"CREATE TABLE"}, others
    assert sorted(b.version for b in batches) == writes
    for b in batches:
        commit = history[b.version]
        assert commit["operation"] == "WRITE" and commit[BATCH_META] == b.batch_id, commit
        metrics = commit["operationMetrics"]
        assert metrics["num_added_rows"] == b.rows and metrics["num_removed_files"] == 0, metrics
        assert transaction_version(uri, b.batch_id, storage_options=opts) == 1


def test_cut_mid_upload_retries_and_commits_once(
    proxied_lakehouse, jsonl_factory, tmp_path, caplog
):
    lh, proxy = proxied_lakehouse, proxied_lakehouse["proxy"]
    texts = []
    for i in range(3):
        rows = make_rows(200, f"cut{i}-{uuid.uuid4().hex[:6]}")
        jsonl_factory(f"in/f{i}.jsonl", rows)
        texts += [r["text"] for r in rows]
    # The 2nd data file upload kills every connection and refuses new ones for 3 s: longer
    # than the SDK's own retries (one, after 0.2 s), so the Prefect task retry has to recover.
    proxy.cut_on(b"part-", seconds=3.0, nth=2, method=b"PUT")
    out = _bronze(lh, tmp_path / "in" / "*.jsonl")
    assert proxy.cuts == 1 and proxy.refused >= 2, (proxy.cuts, proxy.refused)
    task_retries = out.log.count("Retry 1/4 will start")
    assert task_retries >= 1, "the SDK alone recovered: the task retry was not exercised"
    assert out.rows == 600 and len(out.batch_ids) == 3
    lake = open_lakehouse(lh["root"], lh["direct"])
    assert_exactly_once(lake, texts)
    assert_batches_clean(lake, bronze_dir("json", "xx"))
    print(
        f"reliability: fault=proxy_cut cuts={proxy.cuts} refused={proxy.refused} "
        f"task_retries={task_retries} "
        f"rows={out.rows} rows_lost=0 duplicates=0"
    )


def test_delay_is_survived(proxied_lakehouse, jsonl_factory, tmp_path):
    lh, proxy = proxied_lakehouse, proxied_lakehouse["proxy"]
    rows = make_rows(120, f"slow-{uuid.uuid4().hex[:6]}")
    jsonl_factory("in/slow.jsonl", rows)
    proxy.delay(0.05)
    out = _bronze(lh, tmp_path / "in" / "*.jsonl")
    proxy.delay(0)
    assert out.rows == 120
    assert_exactly_once(open_lakehouse(lh["root"], lh["direct"]), [r["text"] for r in rows])
    print(
        f"reliability: fault=proxy_delay_50ms requests={proxy.requests} rows={out.rows} rows_lost=0"
    )


def test_lost_commit_response_commits_once(proxied_lakehouse, jsonl_factory, tmp_path):
    """The commit PUT reaches Azurite but its response is lost: the writer finds its own commit."""
    lh, proxy = proxied_lakehouse, proxied_lakehouse["proxy"]
    rows = make_rows(150, f"lost-{uuid.uuid4().hex[:6]}")
    jsonl_factory("in/lost.jsonl", rows)
    # Version 0 creates the table; version 1 is the data commit whose reply is lost.
    proxy.lose_response_to(b"/_delta_log/00000000000000000001.json", method=b"PUT")
    out = _bronze(lh, tmp_path / "in" / "*.jsonl")
    assert proxy.lost_responses == 1
    assert out.rows == 150 and len(out.batch_ids) == 1, out
    lake = open_lakehouse(lh["root"], lh["direct"])
    [m] = committed_batches(lake, bronze_dir("json", "xx"))
    assert (m.batch_id, m.rows) == (out.batch_ids[0], 150) and m.version >= 1  # v0: create
    assert_exactly_once(lake, [r["text"] for r in rows])  # reads every listed file
    assert_batches_clean(lake, bronze_dir("json", "xx"))
    again = _bronze(lh, tmp_path / "in" / "*.jsonl")
    assert again.rows == 0 and len(again.skipped_sources) == 1
    print(
        f"reliability: fault=lost_commit_response lost={proxy.lost_responses} commits=1 "
        "conflicts=0 rows_lost=0"
    )
