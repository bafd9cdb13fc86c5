"""Bronze flow on a local-folder lakehouse, with a real Prefect server (test harness)."""

from __future__ import annotations

import json
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flows.params import load_params
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import read_version, transaction_version
from tasks.lakehouse.layout import bronze_dir, quarantine_dir
from tasks.lakehouse.storage import Lakehouse, open_lakehouse
from tests.conftest import last_json, run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def make_rows(n: int, tag: str) -> list[dict]:
    """Rows nobody has seen: a fresh tag per call."""
    return [
        {
            "text": f"{tag} ligne {i}: " + "texte " * (i % 11 + 2),
            "url": f"https://{tag}/{i}",
            "timestamp": "2022-02-02T00:00:00Z",
            "source": "test",
        }
        for i in range(n)
    ]


def committed_table(lake: Lakehouse, dataset: str = "json", language: str = "xx") -> pa.Table:
    """Every row of the table's latest version, checked batch by batch against its commits.

    Each batch the table holds was committed once (its application transaction is at 1), in
    its own table version, and holds exactly the rows its lineage counts say.
    """
    uri = lake.table_uri(bronze_dir(dataset, language))
    table = read_version(uri, storage_options=lake.storage_options)
    if table.num_columns == 0:
        return pa.table({"_row_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    batches = committed_batches(lake, bronze_dir(dataset, language))
    assert sum(b.rows for b in batches) == table.num_rows
    assert sorted(b.batch_id for b in batches) == sorted(set(table.column("_batch_id").to_pylist()))
    versions = [b.version for b in batches]
    assert len(set(versions)) == len(versions) and min(versions) >= 0, versions  # one commit each
    for b in batches:
        assert transaction_version(uri, b.batch_id, storage_options=lake.storage_options) == 1
        rows = table.filter(pc.equal(table.column("_batch_id"), b.batch_id))
        assert rows.num_rows == b.rows
        # Row ids are the batch id and a dense row number: a batch is there whole or not at all.
        assert sorted(rows.column("_row_id").to_pylist()) == [
            f"{b.batch_id}-{i:010d}" for i in range(b.rows)
        ]
    return table


def assert_exactly_once(lake: Lakehouse, texts: list[str], **kw) -> None:
    table = committed_table(lake, **kw)
    ids = table.column("_row_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(texts)
    assert sorted(table.column("text").to_pylist()) == sorted(texts)


def _run(root, data_files, **extra):
    from flows.bronze import bronze_flow

    overrides = [
        "source.dataset=json",
        f"source.data_files={data_files}",
        "source.language=xx",
        f"lakehouse.root={root}",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return bronze_flow(params=load_params(overrides=overrides))


def test_ingest_rerun_and_added_file(tmp_path, jsonl_factory):
    root = tmp_path / "lake"
    a = make_rows(120, "a")
    jsonl_factory("in/a.jsonl", a)
    first = _run(root, tmp_path / "in" / "*.jsonl")
    assert first.rows == 120 and len(first.batch_ids) == 1
    lake = open_lakehouse(str(root))
    assert_exactly_once(lake, [r["text"] for r in a])
    table = bronze_dir("json", "xx")
    # The first commit may follow the version that created the table: versions are relative.
    v0 = committed_batches(lake, table)[0].version
    assert [(b.batch_id, b.rows, b.version) for b in committed_batches(lake, table)] == [
        (first.batch_ids[0], 120, v0)
    ]

    again = _run(root, tmp_path / "in" / "*.jsonl")
    assert again.rows == 0 and again.batch_ids == []
    assert again.message.startswith("nothing new") and len(again.skipped_sources) == 1
    assert len(committed_batches(lake, table)) == 1  # the re-run made no commit

    b = make_rows(30, "b")
    jsonl_factory("in/b.jsonl", b)
    third = _run(root, tmp_path / "in" / "*.jsonl")
    assert third.rows == 30 and len(third.batch_ids) == 1
    assert third.skipped_sources == [str((tmp_path / "in" / "a.jsonl").resolve())]
    assert_exactly_once(lake, [r["text"] for r in a + b])
    assert [(b.batch_id, b.rows, b.version) for b in committed_batches(lake, table)] == [
        (first.batch_ids[0], 120, v0),
        (third.batch_ids[0], 30, v0 + 1),
    ]


def test_changed_file_is_reported_not_reingested(tmp_path, jsonl_factory):
    root = tmp_path / "lake"
    rows = make_rows(10, "c")
    src = jsonl_factory("c.jsonl", rows)
    _run(root, src)
    jsonl_factory("c.jsonl", rows + make_rows(3, "c2"))  # same path, new content
    res = _run(root, src)
    assert res.rows == 0 and res.changed_sources == [str(src.resolve())]
    lake = open_lakehouse(str(root))
    assert_exactly_once(lake, [r["text"] for r in rows])
    quarantine = lake.find(quarantine_dir("json", "xx"))
    assert len(quarantine) == 1
    record = json.loads(lake.read_bytes(quarantine[0]))
    assert record["reason"] == "changed_after_ingestion" and "rename" in record["action"]


def test_wiped_lakehouse_is_ingested_again(tmp_path, jsonl_factory):
    """A task cache keyed on inputs must not claim a commit that is no longer there."""
    root = tmp_path / "lake"
    rows = make_rows(20, "w")
    src = jsonl_factory("w.jsonl", rows)
    assert _run(root, src).rows == 20
    shutil.rmtree(root)  # e.g. `rm -rf lakehouse && make demo`
    open_lakehouse.cache_clear()
    res = _run(root, src)
    assert res.rows == 20 and len(res.batch_ids) == 1
    assert_exactly_once(open_lakehouse(str(root)), [r["text"] for r in rows])


def test_event_and_artifact_are_published(tmp_path, jsonl_factory):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import artifact_key

    language = f"ev{uuid.uuid4().hex[:6]}"
    src = jsonl_factory("e.jsonl", make_rows(15, "e"))
    res = _run(tmp_path / "lake", src, **{"source.language": language})
    lake = open_lakehouse(str(tmp_path / "lake"))
    [batch] = committed_batches(lake, bronze_dir("json", language))
    version = batch.version  # after the table-creating version, if any
    key = artifact_key("bronze", "json", language)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
        assert arts and arts[0].type == "table"
        data = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
        # One row per committed batch: its id, rows and the table version that holds it.
        assert data == [{"batch": res.batch_ids[0], "rows": 15, "table version": version}]

        resource = f"lakehouse.bronze.json.{language}"
        body = {
            "filter": {
                "event": {"name": ["lakehouse.bronze.committed"]},
                "resource": {"id": [resource]},
                "occurred": {"since": "2020-01-01T00:00:00Z"},
            },
            "limit": 5,
        }
        events = []
        for _ in range(60):  # the server persists events asynchronously
            events = client._client.post("/events/filter", json=body).json()["events"]
            if events:
                break
            time.sleep(0.5)
    assert events, f"no lakehouse.bronze.committed event for {resource}"
    assert events[0]["payload"]["batch_ids"] == res.batch_ids
    assert events[0]["payload"]["rows"] == 15
    assert events[0]["payload"]["versions"] == [version]
    assert events[0]["payload"]["table"] == res.uri


def test_non_utf8_is_kept_and_logged_in_the_run(tmp_path, caplog):
    src = tmp_path / "cp1252.jsonl"
    src.write_bytes(b'{"text": "na\xefve caf\xe9"}\n{"text": "ok"}\n')
    with caplog.at_level("WARNING"):
        res = _run(tmp_path / "lake", src)
    assert res.rows == 2
    assert "cp1252.jsonl is not valid UTF-8" in caplog.text
    texts = committed_table(open_lakehouse(str(tmp_path / "lake"))).column("text").to_pylist()
    assert texts == ["na\ufffdve caf\ufffd", "ok"]


def test_cli_json_last_line_on_unseen_file(tmp_path, jsonl_factory):
    rows = make_rows(40, uuid.uuid4().hex)
    src = jsonl_factory("fresh.jsonl", rows)
    root = tmp_path / "lake"
    args = [
        "flows",
        "bronze",
        "--set",
        "source.dataset=json",
        "--set",
        f"source.data_files={src}",
        "--set",
        "source.language=xx",
        "--set",
        f"lakehouse.root={root}",
        "--json",
    ]
    res = run_cli(*args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = last_json(res.stdout)
    assert out["rows"] == 40 and len(out["batch_ids"]) == 1 and out["uri"].endswith("json/xx")
    again = last_json(run_cli(*args, timeout=300).stdout)
    assert again["rows"] == 0 and again["skipped_sources"] == [str(src.resolve())]
    assert "nothing new" in again["message"]
    assert_exactly_once(open_lakehouse(str(root)), [r["text"] for r in rows])


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, jsonl_factory):
    src = jsonl_factory("nocol.jsonl", [{"body": "x"}])
    res = run_cli(
        "flows",
        "bronze",
        "--set",
        "source.dataset=json",
        "--set",
        f"source.data_files={src}",
        "--set",
        f"lakehouse.root={tmp_path / 'lake'}",
        timeout=300,
    )
    assert res.returncode == 2
    assert "error: " in res.stderr and "no column 'text'" in res.stderr
    assert "Traceback" not in res.stderr.split("error: ")[-1]
