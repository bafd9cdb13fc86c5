"""`python -m flows silver` as a user runs it: over Spark Connect, and killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.bronze import ingest as bronze
from tasks.bronze import sources
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import BATCH_META, open_table, read_version, transaction_version
from tasks.lakehouse.layout import bronze_dir, rejected_dir, silver_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import SourceParams
from tests.conftest import ROOT, last_json, run_cli

SAMPLE = ROOT / "data" / "sample"
LANG = "xx"


def write_bronze(root: Path, src: Path, files: dict[str, list[str]]) -> list[str]:
    """Commit one bronze batch per file (the bronze layer's functions); returns their ids."""
    lake = open_lakehouse(str(root))
    src.mkdir(parents=True, exist_ok=True)
    ids = []
    for name, texts in files.items():
        path = src / name
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        [unit] = sources.resolve_units("json", None, str(path), "train", None, None, lake)
        outcome = bronze.ingest_source_unit(
            lake,
            unit,
            source=SourceParams(dataset="json", data_files=str(path)),
            dataset_key="json",
            language=LANG,
            token=None,
            max_rows=None,
            parameters={},
            work_dir=src,
        )
        assert outcome.committed
        ids.append(outcome.batch_id)
    return ids


def sample(lang: str) -> list[str]:
    with open(SAMPLE / "culturax" / f"{lang}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def cli_args(root: Path, model: Path, *extra: str) -> list[str]:
    return [
        "flows",
        "silver",
        "--set",
        f"lakehouse.root={root}",
        "--set",
        "source.dataset=json",
        "--set",
        f"source.language={LANG}",
        "--set",
        f"model.name_or_path={model.resolve()}",
        "--set",
        "transform.spark_master=local[2]",
        *extra,
        "--json",
    ]


def tables(root: Path) -> list[str]:
    """The silver and rejected Delta tables under `root` (relative paths)."""
    return sorted(
        p.parent.relative_to(root).as_posix()
        for layer in ("silver", "rejected")
        for p in (root / layer).glob("*/*/*/_delta_log")
    )


def batch_commits(lake, table: str) -> list[dict]:
    """The batch commits of a table, oldest first."""
    t = open_table(lake.table_uri(table), storage_options=lake.storage_options)
    return sorted((e for e in t.history() if e.get(BATCH_META)), key=lambda e: e["version"])


def committed_state(root: Path) -> dict[str, object]:
    """Committed silver and rejected batches: parent, reasons and rows (sorted by _row_id).

    Not file names or bytes: Delta names its own data files, so a re-run after a kill commits
    the same rows under other file names.
    """
    lake = open_lakehouse(str(root))
    out = {}
    for table in tables(root):
        rows = read_version(lake.table_uri(table), storage_options={}).sort_by("_row_id")
        by_batch: dict[str, list[dict]] = {}
        for r in rows.to_pylist():
            by_batch.setdefault(r["_batch_id"], []).append(r)
        commits = batch_commits(lake, table)
        ids = [e[BATCH_META] for e in commits]
        assert len(ids) == len(set(ids)), f"{table}: a batch committed twice"
        for e in commits:
            out[f"{table}/{e[BATCH_META]}"] = (
                e["lakehouse.bronze_batch_id"],
                e["lakehouse.rejected"],
                by_batch.get(e[BATCH_META], []),
            )
    return out


def check_silver(root: Path, result: dict, tokenizer) -> None:
    """Token ids match the tokenizer; every bronze row is in silver or rejected, once; every
    bronze batch is committed once to each table."""
    lake = open_lakehouse(str(root))
    bronze_table = bronze_dir("json", LANG)
    bronze_rows = read_version(lake.table_uri(bronze_table), storage_options={})
    bronze_ids = bronze_rows.column("_row_id").to_pylist()
    table = lake.rel(result["uri"])
    rejected = table.replace("silver/", "rejected/", 1)
    assert rejected == rejected_dir("json", LANG, result["tokenizer"])
    seen = []
    for t in (table, rejected):
        rows = read_version(lake.table_uri(t), storage_options={})
        seen += rows.column("_row_id").to_pylist()
        if t == table:
            data = rows.select(["text", "input_ids"]).to_pylist()
            assert [r["input_ids"] for r in data] == [
                tokenizer(r["text"])["input_ids"] for r in data
            ]
        parents = [e["lakehouse.bronze_batch_id"] for e in batch_commits(lake, t)]
        assert sorted(parents) == sorted(b.batch_id for b in committed_batches(lake, bronze_table))
    assert len(seen) == len(set(seen)) == len(bronze_ids)
    assert sorted(seen) == sorted(bronze_ids)


# The Spark Connect promise, in `make test`: 3.5 min on the 2-core machine at load average 15
# (the server's JVM start, its first Python workers, two CLI runs), 1 min of it the server start.
def test_cli_over_spark_connect(spark_connect, prefect_harness, tiny_models, tmp_path):
    root = tmp_path / "lake"
    texts = sample("fr")
    write_bronze(
        root, tmp_path / "src", {"a.jsonl": texts[:200], "b.jsonl": texts[150:] + texts[:20]}
    )
    proc = run_cli(
        *cli_args(root, tiny_models["t5"], "--set", f"transform.spark_remote={spark_connect}"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert len(result["batch_ids"]) == 2 and result["rows"] > 0
    assert result["rejected"].get("duplicate", 0) >= 40

    from tasks.silver.tokenize import load_tokenizer

    check_silver(root, result, load_tokenizer(str(tiny_models["t5"])))

    again = run_cli(
        *cli_args(root, tiny_models["t5"], "--set", f"transform.spark_remote={spark_connect}"),
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["batch_ids"] == []
    assert last_json(again.stdout)["message"].startswith("nothing to do")


def test_cli_killed_mid_silver_then_rerun(prefect_harness, tiny_models, tmp_path):
    """SIGKILL the whole process group once silver starts committing; re-run; compare."""
    texts = sample("en") + sample("it")
    files = {f"{i}.jsonl": texts[i * 70 : (i + 1) * 70] + texts[:10] for i in range(8)}
    clean, killed = tmp_path / "clean" / "lake", tmp_path / "killed" / "lake"
    write_bronze(clean, tmp_path / "src", files)
    shutil.copytree(clean / "bronze", killed / "bronze")  # same bronze, same commit times

    from tasks.silver.plan import open_tokenizer, silver_app_id

    bronze_ids = [
        b.batch_id for b in committed_batches(open_lakehouse(str(clean)), bronze_dir("json", LANG))
    ]
    assert len(bronze_ids) == 8
    key = open_tokenizer(str(tiny_models["t5"]))[1].key
    lake = open_lakehouse(str(killed))
    silver_uri = lake.table_uri(silver_dir("json", LANG, key))
    rejected_uri = lake.table_uri(rejected_dir("json", LANG, key))
    rejected_log = killed / rejected_dir("json", LANG, key) / "_delta_log"

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", *cli_args(killed, tiny_models["t5"])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        # Kill as soon as the first commit of the first batch (its rejected rows) is in the log
        # (not the table's creation: silver creates both tables before the executors write).
        while time.time() < deadline and proc.poll() is None:
            if rejected_log.is_dir() and any(
                "silver-of-" in f.read_text(errors="replace") for f in rejected_log.glob("0*.json")
            ):
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the JVM and the Python workers too
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    # It died by the signal (not finished or failed on its own) ...
    assert proc.returncode == -signal.SIGKILL
    # ... after committing something and while a bronze batch was still not in silver.
    rejected_done = [
        b
        for b in bronze_ids
        if transaction_version(rejected_uri, silver_app_id(b), storage_options={})
    ]
    silver_done = [
        b
        for b in bronze_ids
        if transaction_version(silver_uri, silver_app_id(b), storage_options={})
    ]
    assert rejected_done, "killed before the first commit: the test proved nothing"
    assert len(silver_done) < len(bronze_ids), "killed after the last commit"
    assert set(silver_done) <= set(rejected_done)  # rejected rows are committed first

    results = {}
    for root in (killed, clean):
        done = run_cli(*cli_args(root, tiny_models["t5"]), timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        results[root] = last_json(done.stdout)
    assert sorted(results[killed]["parent_batch_ids"]) == sorted(set(bronze_ids) - set(silver_done))
    assert committed_state(killed) == committed_state(clean)
    assert len([k for k in committed_state(clean) if k.startswith("silver/")]) == 8
    assert len([k for k in committed_state(clean) if k.startswith("rejected/")]) == 8
    for b in bronze_ids:  # each batch committed once to each table
        assert transaction_version(silver_uri, silver_app_id(b), storage_options={}) == 1
        assert transaction_version(rejected_uri, silver_app_id(b), storage_options={}) == 1

    from tasks.silver.tokenize import load_tokenizer

    check_silver(killed, results[killed], load_tokenizer(str(tiny_models["t5"])))
