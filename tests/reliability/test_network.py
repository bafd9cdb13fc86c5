"""Network faults between the real bronze flow and real Azurite, injected by a TCP proxy."""

from __future__ import annotations

import uuid

import pytest

from flows.params import load_params
from tasks.lakehouse.layout import batch_dir, bronze_dir
from tasks.lakehouse.manifest import committed_manifests
from tasks.lakehouse.storage import open_lakehouse
from tests.integration.test_bronze_local import assert_exactly_once, make_rows

pytestmark = pytest.mark.reliability


def _bronze(lh: dict, data_files, **extra):
    from flows.bronze import bronze_flow

    overrides = [
        "source.dataset=json",
        f"source.data_files={data_files}",
        "source.language=xx",
        f"lakehouse.root={lh['root']}",
        f"lakehouse.block={lh['block']}",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return bronze_flow(params=load_params(overrides=overrides))


def assert_batches_clean(lake, table: str) -> None:
    """Each committed batch folder holds exactly its manifest's files (no partial leftovers)."""
    for m in committed_manifests(lake, table):
        names = set(lake.listdir(batch_dir(table, m.batch_id)))
        assert names == {f.path for f in m.files} | {"_manifest.json"}, names


def test_cut_mid_upload_retries_and_commits_once(
    proxied_lakehouse, jsonl_factory, tmp_path, caplog
):
    lh, proxy = proxied_lakehouse, proxied_lakehouse["proxy"]
    texts = []
    for i in range(3):
        rows = make_rows(200, f"cut{i}-{uuid.uuid4().hex[:6]}")
        jsonl_factory(f"in/f{i}.jsonl", rows)
        texts += [r["text"] for r in rows]
    # The 4th part upload kills every connection and refuses new ones for 3 s: longer than
    # the SDK's own retries (one, after 0.2 s), so the Prefect task retry has to recover.
    proxy.cut_on(b"part-", seconds=3.0, nth=4, method=b"PUT")
    out = _bronze(lh, tmp_path / "in" / "*.jsonl", **{"source.rows_per_part": 50})
    assert proxy.cuts == 1 and proxy.refused >= 2, (proxy.cuts, proxy.refused)
    task_retries = caplog.text.count("Retry 1/4 will start")
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
    out = _bronze(lh, tmp_path / "in" / "*.jsonl", **{"source.rows_per_part": 40})
    proxy.delay(0)
    assert out.rows == 120
    assert_exactly_once(open_lakehouse(lh["root"], lh["direct"]), [r["text"] for r in rows])
    print(
        f"reliability: fault=proxy_delay_50ms requests={proxy.requests} rows={out.rows} rows_lost=0"
    )


def test_lost_manifest_response_commits_once(proxied_lakehouse, jsonl_factory, tmp_path):
    """The manifest PUT reaches Azurite but its response is lost: the retry sees its own write."""
    lh, proxy = proxied_lakehouse, proxied_lakehouse["proxy"]
    rows = make_rows(150, f"lost-{uuid.uuid4().hex[:6]}")
    jsonl_factory("in/lost.jsonl", rows)
    proxy.lose_response_to(b"_manifest.json", method=b"PUT")
    out = _bronze(lh, tmp_path / "in" / "*.jsonl", **{"source.rows_per_part": 50})
    assert proxy.lost_responses == 1
    assert out.rows == 150 and len(out.batch_ids) == 1, out
    lake = open_lakehouse(lh["root"], lh["direct"])
    [m] = committed_manifests(lake, bronze_dir("json", "xx"))
    assert m.batch_id == out.batch_ids[0]
    assert_exactly_once(lake, [r["text"] for r in rows])  # reads every listed file
    assert_batches_clean(lake, bronze_dir("json", "xx"))
    again = _bronze(lh, tmp_path / "in" / "*.jsonl")
    assert again.rows == 0 and len(again.skipped_sources) == 1
    print(
        f"reliability: fault=lost_manifest_response lost={proxy.lost_responses} commits=1 "
        "conflicts=0 rows_lost=0"
    )
