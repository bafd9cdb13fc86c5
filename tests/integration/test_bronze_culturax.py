"""Bronze over a folder laid out like the uonlp/CulturaX dataset repo (offline).

`<lang>/<lang>_part_0000N.parquet` shards and a README.md whose YAML `configs:` map each language
to its files, ingested through the same `datasets` resolution the Hub uses
(`source.dataset=<folder>`, `source.name=<lang>`), several shards at once, with a row budget
smaller than one shard that spans runs.
"""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.params import load_params
from tasks.bronze.sources import resolve_units
from tasks.lakehouse.delta import read_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import dataset_slug
from tasks.report import artifact_key
from tests.conftest import last_json, run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

SHARDS, ROWS, GROUP = 6, 30, 8  # rows per shard, rows per parquet row group


def make_culturax(root: Path, langs=("es", "fr")) -> Path:
    """A dataset repo like uonlp/CulturaX: per-language parquet shards and README configs."""
    repo = root / "CulturaX"
    configs = []
    for lang in langs:
        for s in range(SHARDS):
            rows = [
                {
                    "text": f"{lang} shard {s} doc {i}: " + "palabra " * (i % 9 + 3),
                    "timestamp": "2021-03-04 05:06:07",
                    "url": f"https://{lang}.example/{s}/{i}",
                    "source": "mC4" if i % 2 else "OSCAR-2019",
                }
                for i in range(ROWS)
            ]
            path = repo / lang / f"{lang}_part_{s:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=GROUP)
        configs.append(f'- config_name: {lang}\n  data_files: "{lang}/*.parquet"\n')
    (repo / "README.md").write_text(
        "---\npretty_name: CulturaX\nconfigs:\n" + "".join(configs) + "---\n# CulturaX\n",
        encoding="utf-8",
    )
    return repo


def shard_rows(repo: Path, lang: str) -> dict[str, list[str]]:
    """Each shard's texts, in file order (what bronze must hold, row for row)."""
    return {
        str(p.resolve()): pq.read_table(p).column("text").to_pylist()
        for p in sorted((repo / lang).glob("*.parquet"))
    }


def assert_each_row_once(root: Path, repo: Path, lang: str) -> None:
    lake = open_lakehouse(str(root))
    table = read_version(
        lake.table_uri(bronze_dir(dataset_slug(str(repo)), lang)), storage_options={}
    )
    got: dict[str, dict[int, str]] = {}
    for r in table.select(["_source_file", "_row_id", "text"]).to_pylist():
        index = int(r["_row_id"].rsplit("-", 1)[1])
        by_index = got.setdefault(r["_source_file"], {})
        assert index not in by_index, f"row {index} of {r['_source_file']} twice"
        by_index[index] = r["text"]
    want = shard_rows(repo, lang)
    assert sorted(got) == sorted(want)
    for shard, texts in want.items():
        assert [got[shard][i] for i in sorted(got[shard])] == texts  # every row, in order
    assert table.num_rows == SHARDS * ROWS


def _bronze(root: Path, repo: Path, lang: str, **extra):
    from flows.bronze import bronze_flow

    overrides = [f"source.dataset={repo}", f"source.name={lang}", f"lakehouse.root={root}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return bronze_flow(params=load_params(overrides=overrides))


def test_folder_with_readme_configs_is_a_dataset_repo(tmp_path):
    repo = make_culturax(tmp_path)
    units = resolve_units(str(repo), "es", None, "train", None, None)
    assert [Path(u.uri).name for u in units] == [f"es_part_{s:05d}.parquet" for s in range(6)]
    assert {u.builder for u in units} == {"parquet"}
    assert all(u.fingerprint.startswith("sha256:") and u.size for u in units)  # by content


def test_budget_spanning_runs_ingests_every_shard_row_once(tmp_path):
    repo = make_culturax(tmp_path)
    root = tmp_path / "lake"
    budget = 25  # smaller than one shard (30 rows)
    # As a new user types it: the demo config's data_files and language do not leak in.
    args = ["flows", "bronze", "--set", f"source.dataset={repo}", "--set", "source.name=es"]
    args += ["--set", f"lakehouse.root={root}", "--set", f"source.max_rows={budget}"]
    cli = run_cli(*args, "--set", "source.concurrency=3", "--json", timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    first = last_json(cli.stdout)
    assert first["rows"] == budget and first["uri"].endswith("/es")
    assert len(first["partial_sources"]) == 3 and len(first["pending_sources"]) == 3
    # Progress after each unit, with an estimate of the time left (the budget is the goal).
    assert re.search(r"bronze: 1 of 6 unit\(s\) done \(\d partial\), 5 pending, .*left", cli.stderr)
    results = [first]
    for _ in range(20):
        res = _bronze(root, repo, "es", **{"source.max_rows": budget, "source.concurrency": 3})
        results.append(res.model_dump())
        assert res.rows <= budget
        if not res.partial_sources and not res.pending_sources:
            break
    assert_each_row_once(root, repo, "es")
    assert sum(r["rows"] for r in results) == SHARDS * ROWS
    assert len(results) <= (SHARDS * ROWS) // budget + 4  # the budget is mostly used
    again = _bronze(root, repo, "es", **{"source.max_rows": budget})
    assert again.rows == 0 and again.batch_ids == [] and len(again.skipped_sources) == SHARDS
    assert again.message.startswith("nothing new")
    # Each run that ingested left a progress artifact at 100% saying what it did.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = artifact_key("bronze-progress", dataset_slug(str(repo)), "es")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert len(arts) == len(results) and {a.type for a in arts} == {"progress"}
    assert {float(a.data) for a in arts} == {100.0}
    assert all("rows committed" in a.description for a in arts)


def test_two_concurrent_runs_commit_each_row_once(tmp_path):
    repo = make_culturax(tmp_path)
    root = tmp_path / "lake"
    settings = {"source.max_rows": 70, "source.concurrency": 3}
    totals = 0
    for _ in range(12):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(_bronze, root, repo, "fr", **settings) for _ in range(2)]
            results = [r.result() for r in runs]
        totals += sum(r.rows for r in results)
        if all(not r.partial_sources and not r.pending_sources for r in results):
            break
    assert_each_row_once(root, repo, "fr")
    assert totals == SHARDS * ROWS  # the runs' committed rows add up: nothing counted twice
