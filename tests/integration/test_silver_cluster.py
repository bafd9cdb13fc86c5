"""Silver on a real two-worker Spark standalone cluster (127.0.0.1), over a local lakehouse.

The executors write the silver and rejected parts into the tables' folders; the driver (its own
process here, as on a cluster) commits only what successful tasks report. The workers cannot
import this repo: the worker modules travel as a zip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tasks.lakehouse.delta import live_files
from tasks.lakehouse.storage import open_lakehouse
from tasks.silver.plan import open_tokenizer, plan_silver
from tests.integration.test_silver import (
    DS,
    LANG,
    _snapshot,
    check_invariants,
    ingest,
    run_silver,
    sample_texts,
)

ROOT = Path(__file__).resolve().parents[2]
PART_NAME = re.compile(r"part-[0-9a-f]+-\d{5}-\d{4}-a\d+-[0-9a-f]{32}\.parquet")


def driver(cluster, root: Path | str, tokenizer: str, *extra: str) -> subprocess.Popen:
    """`python -m tests.fixtures.silver_run` against the cluster, as its own driver process."""
    env = {**os.environ, "PYSPARK_PYTHON": cluster.python, "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYSPARK_DRIVER_PYTHON", None)
    args = [sys.executable, "-m", "tests.fixtures.silver_run", "--root", str(root)]
    args += ["--tokenizer", tokenizer, "--master", cluster.url, *extra]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    """The driver's JSON result and its log (Spark's driver-side warnings included)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), err


def bronze_files(src: Path, files: dict[str, list[str]], lake) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for fname, rows in files.items():  # bronze batches, committed in this order
        (src / fname).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        ingest(lake, src / fname)


def test_cluster_equals_local(spark, spark_cluster, tiny_models, tmp_path):
    tok = str(tiny_models["t5"])
    texts = sample_texts("nl", "fr")
    files = {
        "a.jsonl": texts[:120],
        "b.jsonl": texts[100:220] + texts[:20] + ["too short", ""],
        "c.jsonl": texts[210:330] + texts[50:60],
    }
    local = open_lakehouse(str(tmp_path / "local" / "lake"))
    bronze_files(tmp_path / "src", files, local)
    shutil.copytree(
        tmp_path / "local" / "lake" / "bronze", tmp_path / "cluster" / "lake" / "bronze"
    )
    plan_local, _ = run_silver(local, tok, spark, tmp_path / "local")

    started = time.perf_counter()
    # The tokenizer as a user types it: relative to the driver's folder (the executors run in
    # their own work folders: the driver hands them the absolute path).
    relative = os.path.relpath(tok, ROOT)
    assert not relative.startswith("..")
    result, _ = finish(driver(spark_cluster, tmp_path / "cluster" / "lake", relative))
    print(f"cluster silver: {time.perf_counter() - started:.1f}s (driver process included)")
    # The executors imported the shipped zip, not this checkout.
    assert not result["worker_module"].startswith(str(ROOT)), result["worker_module"]
    assert ".zip" in result["worker_module"]
    cluster = open_lakehouse(str(tmp_path / "cluster" / "lake"))
    _, info = open_tokenizer(tok, None, LANG)
    plan_cluster = plan_silver(cluster, DS, LANG, info)
    assert plan_cluster.pending == []
    assert len(result["outcomes"]) == 3 and all(o["committed"] for o in result["outcomes"])
    # Same rows, token ids, rejects (reason, detail, duplicate_of) and commits as local[2].
    assert _snapshot(cluster, plan_cluster) == _snapshot(local, plan_local)
    check_invariants(cluster, plan_cluster)


def test_cluster_on_azurite_equals_local(
    spark, spark_cluster, azure_lakehouse, tiny_models, tmp_path
):
    """An az:// lakehouse: the cluster's executors read bronze and write the parts through adlfs
    with a container SAS (no JVM Azure connector); same commits and rows as local[2] over a
    local folder."""
    tok = str(tiny_models["t5"])
    texts = sample_texts("de", "es")
    files = {"a.jsonl": texts[:150], "b.jsonl": texts[120:260] + texts[:10] + ["tiny", ""]}
    local = open_lakehouse(str(tmp_path / "local" / "lake"))
    azure = open_lakehouse(azure_lakehouse["root"], azure_lakehouse["block"])
    bronze_files(tmp_path / "src", files, local)
    for fname in files:  # the same source files: the same bronze batch ids
        ingest(azure, tmp_path / "src" / fname)
    plan_local, _ = run_silver(local, tok, spark, tmp_path / "local")

    proc = driver(
        spark_cluster,
        azure_lakehouse["root"],
        tok,
        "--block",
        azure_lakehouse["block"],
    )
    result, _ = finish(proc)
    assert [o["committed"] for o in result["outcomes"]] == [True, True]
    _, info = open_tokenizer(tok, None, LANG)
    plan_azure = plan_silver(azure, DS, LANG, info)
    assert plan_azure.pending == []
    # The parts were written by the executors (names carry partition and task attempt), into
    # the container.
    for table in (plan_azure.table, plan_azure.rejected_table):
        for uri in live_files(azure.table_uri(table), storage_options=azure.storage_options):
            name = uri.rsplit("/", 1)[-1]
            assert uri.startswith("az://") and PART_NAME.fullmatch(name), uri
    assert _snapshot(azure, plan_azure) == _snapshot(local, plan_local)
    check_invariants(azure, plan_azure)


def test_killed_worker_commits_each_batch_once(spark_cluster, tiny_models, tmp_path):
    tok = str(tiny_models["t5"])
    texts = sample_texts("nl", "fr", "de", "pt", "es", "it", "en")
    # About 2,200 rows in two batches, small parts: the write stage lasts long enough to be hit.
    files = {"a.jsonl": texts[:1100], "b.jsonl": texts[1100:] + texts[:50]}
    lake = open_lakehouse(str(tmp_path / "lake"))
    bronze_files(tmp_path / "src", files, lake)
    _, info = open_tokenizer(tok, None, LANG)
    plan = plan_silver(lake, DS, LANG, info)
    folders = [lake.local_path(plan.table), lake.local_path(plan.rejected_table)]

    proc = driver(spark_cluster, tmp_path / "lake", tok, "--rows-per-part", "100")
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if any(any(f.glob("part-*.parquet")) for f in folders if f.is_dir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before a worker could be killed"
        spark_cluster.kill_worker(0)  # mid-write: some parts of the lost tasks are orphans
        result, log = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        spark_cluster.workers.pop(0)
        spark_cluster.start_worker(len(spark_cluster.workers) + 1)

    # The kill cost Spark an executor mid-job, and Spark rescheduled its work.
    assert "Lost executor" in log or "ExecutorLostFailure" in log, log[-3000:]
    assert [o["committed"] for o in result["outcomes"]] == [True, True]
    after = plan_silver(lake, DS, LANG, info)
    assert after.pending == []
    good, bad = check_invariants(lake, after)  # once each; silver + rejected = bronze
    opts = lake.storage_options
    live = {
        Path(f.removeprefix("file://")).name
        for t in (after.table, after.rejected_table)
        for f in live_files(lake.table_uri(t), storage_options=opts)
    }
    on_disk = {p.name for f in folders for p in f.glob("part-*.parquet")}
    assert live <= on_disk
    orphans = on_disk - live
    print(f"killed worker: {len(live)} committed parts, {len(orphans)} orphan part(s) left")
    # No orphan is read: the committed rows are exactly the bronze rows, once.
    assert good.num_rows + bad.num_rows == sum(b.rows for b in plan.pending)
