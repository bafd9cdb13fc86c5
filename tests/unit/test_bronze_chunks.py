"""A unit cut by the row budget goes on where it stopped, chunk by chunk, until complete."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.bronze import ingest as bronze
from tasks.bronze import sources
from tasks.bronze.progress import chunk_batch_id, unit_progress
from tasks.lakehouse.delta import read_version, transaction_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import SourceParams


def _rows(n: int) -> list[dict]:
    return [{"text": f"doc {i} " + "mot " * (i % 5 + 2), "n": i} for i in range(n)]


def _units(lake, dataset, path):
    return sources.resolve_units(dataset, None, str(path), "train", None, None, lake)


def _run_until_done(lake, dataset, path, budget, tmp_path, *, limit=50):
    """Bronze runs with `budget` rows each until the plan has nothing left; their outcomes."""
    outcomes = []
    for _ in range(limit):
        plan = sources.plan_units(lake, dataset, "xx", _units(lake, dataset, path))
        if not plan.todo:
            return outcomes, plan
        [unit] = plan.todo
        outcomes.append(
            bronze.ingest_source_unit(
                lake,
                unit,
                source=SourceParams(dataset=dataset, data_files=str(path)),
                dataset_key=dataset,
                language="xx",
                token=None,
                max_rows=budget,
                parameters={},
                work_dir=tmp_path,
                progress=plan.progress.get(unit.uri),
            )
        )
    raise AssertionError("unit never completed")


def _check_table(lake, dataset, n):
    rows = read_version(lake.table_uri(bronze_dir(dataset, "xx")), storage_options={})
    assert sorted(rows.column("n").to_pylist()) == list(range(n))  # every row once
    ids = rows.column("_row_id").to_pylist()
    unit_id = ids[0].rsplit("-", 1)[0]
    assert sorted(ids) == [f"{unit_id}-{i:010d}" for i in range(n)]  # index in the unit
    return rows, unit_id


@pytest.mark.parametrize(("n", "budget"), [(23, 5), (20, 5), (7, 100)])
def test_json_unit_goes_on_chunk_by_chunk(tmp_path, jsonl_factory, n, budget):
    src = jsonl_factory("a.jsonl", _rows(n))
    lake = open_lakehouse(str(tmp_path / "lake"))
    outcomes, plan = _run_until_done(lake, "json", src, budget, tmp_path)
    assert plan.skipped == [str(src.resolve())] and plan.partial == []
    rows, unit_id = _check_table(lake, "json", n)
    # Chunk k commits as version k of the unit's app id, each its own bronze batch.
    assert [o.chunk for o in outcomes] == list(range(1, len(outcomes) + 1))
    assert [o.batch_id for o in outcomes] == [chunk_batch_id(unit_id, o.chunk) for o in outcomes]
    assert [o.offset for o in outcomes] == [budget * i for i in range(len(outcomes))]
    assert all(o.committed for o in outcomes)
    # A budget that ends exactly at the end of the unit needs one empty closing chunk.
    assert len(outcomes) == n // budget + 1
    assert [o.partial for o in outcomes] == [True] * (len(outcomes) - 1) + [False]
    uri = lake.table_uri(bronze_dir("json", "xx"))
    assert transaction_version(uri, unit_id, storage_options={}) == len(outcomes)
    [progress] = unit_progress(lake, bronze_dir("json", "xx"), [unit_id]).values()
    assert (progress.rows, progress.done) == (n, True)


def test_parquet_unit_resumes_at_its_row_group(tmp_path, monkeypatch):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(95)), path, row_group_size=10)
    read_groups = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **kw):
        read_groups.append(list(row_groups or []))
        return original(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    lake = open_lakehouse(str(tmp_path / "lake"))
    outcomes, _ = _run_until_done(lake, "parquet", path, 33, tmp_path)
    _check_table(lake, "parquet", 95)
    assert [(o.offset, o.rows) for o in outcomes] == [(0, 33), (33, 33), (66, 29)]
    # Later chunks start at the row group holding their first row (33 -> 3, 66 -> 6).
    assert [g[0] for g in read_groups if g][-2:] == [3, 6]
