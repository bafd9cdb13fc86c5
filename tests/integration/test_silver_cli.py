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

import pyarrow.parquet as pq
import pytest

from tasks.bronze import ingest as bronze
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.manifest import committed_manifests
from tasks.lakehouse.storage import open_lakehouse
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
        [unit] = bronze.resolve_units("json", None, str(path), "train", None, None, lake)
        m, _ = bronze.ingest_unit(
            lake,
            unit,
            dataset_key="json",
            language=LANG,
            split="train",
            name=None,
            text_column="text",
            target_column=None,
            token=None,
            rows_per_part=100,
            max_rows=None,
            parameters={},
            work_dir=src,
        )
        ids.append(m.batch_id)
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


def committed_state(root: Path) -> dict[str, object]:
    """Committed silver and rejected batches: rows, reasons and file hashes."""
    lake = open_lakehouse(str(root))
    out = {}
    for table in sorted(
        {p.parent.relative_to(root).as_posix() for p in (root / "silver").rglob("batch=*")}
    ):
        for m in committed_manifests(lake, table):
            out[f"{table}/{m.batch_id}"] = (
                m.rows,
                m.rejected,
                m.parents,
                [(f.path, f.sha256) for f in m.files],
            )
    return out


def check_silver(root: Path, result: dict, tokenizer) -> None:
    """Token ids match the tokenizer; every bronze row is in silver or rejected, once."""
    lake = open_lakehouse(str(root))
    bronze_rows = sum(m.rows for m in committed_manifests(lake, bronze_dir("json", LANG)))
    table = lake.rel(result["uri"])
    seen = []
    for t in (table, f"{table}/_rejected"):
        for m in committed_manifests(lake, t):
            for rel in m.file_paths():
                data = pq.read_table(lake.local_path(rel)).to_pylist()
                seen += [r["_row_id"] for r in data]
                if t == table:
                    assert [r["input_ids"] for r in data] == [
                        tokenizer(r["text"])["input_ids"] for r in data
                    ]
    assert len(seen) == len(set(seen)) == bronze_rows


# ~1-2 minutes on 2 cores (a second JVM, the server's first Python workers, two CLI runs): too
# slow for `make test`; run by `make test-all`. The in-process flow tests cover local mode.
@pytest.mark.slow
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

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", *cli_args(killed, tiny_models["t5"])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (
            any((killed / "silver").rglob("_rejected/batch=*/_manifest.json"))
            if (killed / "silver").exists()
            else False
        ):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the JVM and the Python workers too
    proc.wait(30)

    results = {}
    for root in (killed, clean):
        done = run_cli(*cli_args(root, tiny_models["t5"]), timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        results[root] = last_json(done.stdout)
    assert committed_state(killed) == committed_state(clean)
    assert len([k for k in committed_state(clean) if "_rejected" not in k]) == 8

    from tasks.silver.tokenize import load_tokenizer

    check_silver(killed, results[killed], load_tokenizer(str(tiny_models["t5"])))
