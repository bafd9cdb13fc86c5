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


def test_hub_files_are_identified_by_content_not_commit(monkeypatch):
    """The Hub is unreachable here: `datasets`' resolution and the Hub's file metadata are
    stubbed with what they return (hf:// URLs at a commit; LFS sha256 / blob id per path)."""
    import types

    import datasets
    import huggingface_hub

    shas = {"fr/fr_part_00000.parquet": "a" * 64, "fr/fr_part_00001.parquet": "b" * 64}

    def builder(dataset, name, **kw):
        files = [f"hf://datasets/uonlp/CulturaX@{commit}/{p}" for p in sorted(shas)]
        config = types.SimpleNamespace(data_files={"train": files})
        return types.SimpleNamespace(config=config, name="parquet", hash="x")

    def paths_info(self, repo, paths, revision=None, repo_type=None):
        assert (repo, revision, repo_type) == ("uonlp/CulturaX", commit, "dataset")
        lfs = types.SimpleNamespace
        return [types.SimpleNamespace(path=p, lfs=lfs(sha256=shas[p]), size=9) for p in paths]

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", paths_info)

    def units():
        return sources.resolve_units("uonlp/CulturaX", "fr", None, "train", None, None)

    commit = "1" * 40
    before = units()
    assert [u.uri for u in before] == [f"hf://datasets/uonlp/CulturaX/{p}" for p in sorted(shas)]
    assert [u.fingerprint for u in before] == [f"sha256:{'a' * 64}", f"sha256:{'b' * 64}"]
    assert before[0].location == f"hf://datasets/uonlp/CulturaX@{commit}/fr/fr_part_00000.parquet"
    commit = "2" * 40  # a new repo commit (a README edit): same files, same units and batches
    after = units()
    ids = [sources.batch_id_for("culturax", "fr", u) for u in after]
    assert ids == [sources.batch_id_for("culturax", "fr", u) for u in before]
    shas["fr/fr_part_00001.parquet"] = "c" * 64  # one file's content changed: a new identity
    changed = units()
    assert changed[0] == after[0]  # unchanged file: same unit
    assert changed[1].fingerprint == f"sha256:{'c' * 64}" and changed[1].uri == after[1].uri
