"""Silver benchmark on a generated CulturaX-shaped corpus, bronze already committed.

`python -m bench.silver [--mb 100] [--model DIR]` (`make bench-scale`: `--mb 1000`) generates
documents of 1-5 KB from the shipped sample's seven languages (each document unique, about 1%
exact duplicates, a few too short), commits them to bronze in four files, then measures in one
run, side by side:

- the tokenize step: silver's `mapInArrow` tokenize (`encode_partition`, warm JVM and workers)
  vs the plain fast tokenizer with all cores (goal >= 0.8x) and vs
  `datasets.map(batched=True, num_proc=2)` (goal >= 1.5x);
- the whole silver job (read bronze, clean, tokenize, dedupe, write the parts, commit) in MB/s
  on `local[2]` and on a two-worker standalone cluster (127.0.0.1, 1 core and 1 GB each), next
  to the backend tokenizer's `encode_batch_fast` on two threads over the same texts (goal
  >= 0.5x);
- on the cluster, the driver's peak RSS (its Python process and its JVM, sampled) at 4x the data
  vs 1x (goal <= 1.2x), and the largest executor's peak RSS (JVM and Python workers);
- a run over 10% new bronze rows after the full run (goal <= 0.2 of the full run's time).

Prints `name: value` lines; the exit status is 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench import ingest_jsonl

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "culturax"


def make_corpus(megabytes: float, seed: int = 7) -> list[str]:
    """Documents of 1-5 KB (UTF-8), several languages, unique but for ~1% exact duplicates and
    ~0.5% too short: about `megabytes` MB of text."""
    rng = random.Random(seed)
    paragraphs: dict[str, list[str]] = {}
    for path in sorted(SAMPLE.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            paragraphs[path.stem] = [json.loads(line)["text"] for line in fh]
    langs = sorted(paragraphs)
    target, total, docs = megabytes * 1e6, 0, []
    while total < target:
        n = len(docs)
        if docs and rng.random() < 0.01:
            doc = docs[rng.randrange(len(docs))]  # an exact duplicate
        elif rng.random() < 0.005:
            doc = f"short {n}"
        else:
            pool = paragraphs[langs[n % len(langs)]]
            size, parts = rng.randint(1000, 5000), [f"doc {n}"]
            length = len(parts[0])
            while length < size:
                p = pool[rng.randrange(len(pool))]
                parts.append(p)
                length += len(p.encode("utf-8")) + 1
            doc = "\n".join(parts)[: size * 2]
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def bench_raw(tok, texts: list[str]) -> float:
    """Seconds for the plain fast tokenizer, batch-encoding with its own thread pool."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0 = time.perf_counter()
    for i in range(0, len(texts), 10_000):
        tok(texts[i : i + 10_000], return_attention_mask=False)
    seconds = time.perf_counter() - t0
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return seconds


def bench_backend_two_threads(tok, texts: list[str]) -> float:
    """Seconds for the backend tokenizer's `encode_batch_fast` on two threads (the work the
    whole silver job must do at least, on the two cores Spark gets)."""
    backend = tok.backend_tokenizer
    halves = [texts[: len(texts) // 2], texts[len(texts) // 2 :]]

    def encode(part: list[str]) -> None:
        for i in range(0, len(part), 1000):
            backend.encode_batch_fast(part[i : i + 1000])

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threads = [threading.Thread(target=encode, args=(h,)) for h in halves]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench_datasets(model: str, texts: list[str], work: Path) -> float:
    """Seconds for `datasets.map(batched=True, num_proc=2)` (the usual HF recipe)."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model, use_fast=True)
    ds = datasets.Dataset.from_dict({"text": texts})

    def encode(batch):
        return tok(batch["text"], return_attention_mask=False)

    t0 = time.perf_counter()
    ds.map(
        encode,
        batched=True,
        num_proc=2,
        remove_columns=["text"],
        cache_file_name=str(work / "datasets-map.arrow"),
    )
    return time.perf_counter() - t0


def bench_spark_step(spark, texts: list[str], model: str, slices: int) -> dict[str, float]:
    """Seconds for silver's tokenize `mapInArrow` over cached input (noop sink: compute only)."""
    import pyarrow as pa

    from tasks.silver.tokenize import encode_partition

    table = pa.table({"_row_id": [f"r{i:010d}" for i in range(len(texts))], "text": texts})
    df = spark.createDataFrame(table).repartition(slices).cache()
    df.count()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1000")
    bare = functools.partial(encode_partition, tokenizer=model)

    def run(rows: int | None = None) -> float:
        src = df.limit(rows) if rows else df
        t0 = time.perf_counter()
        src.mapInArrow(bare, "_row_id string, input_ids array<int>").write.format("noop").mode(
            "overwrite"
        ).save()
        return time.perf_counter() - t0

    out = {"warmup": run(rows=slices * 10), "bare": run()}
    df.unpersist()
    return out


class PeakRss:
    """Samples the summed RSS of process trees every 0.2 s; keeps each tree's peak."""

    def __init__(self, roots):
        self.roots, self.peaks = roots, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.roots().items():
                total = 0
                for pid in pids:
                    try:
                        proc = psutil.Process(pid)
                        tree = [proc, *proc.children(recursive=True)]
                    except psutil.Error:
                        continue
                    for p in tree:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                self.peaks[name] = max(self.peaks.get(name, 0), total)
            self._stop.wait(0.2)


def executors(cluster) -> dict[str, list[int]]:
    """The executor JVMs under each worker (their Python workers are their children)."""
    out = {}
    for i, worker in enumerate(cluster.workers):
        try:
            kids = psutil.Process(worker.pid).children(recursive=True)
        except psutil.Error:
            continue
        pids = []
        for p in kids:
            try:
                if "CoarseGrainedExecutorBackend" in " ".join(p.cmdline() or []):
                    pids.append(p.pid)
            except psutil.Error:  # gone (or a zombie) since the listing
                pass
        out[f"executor-{i}"] = pids
    return out


def cluster_run(cluster, root: Path, model: str) -> dict[str, float]:
    """Silver on the cluster with its own driver process: seconds, driver and executor peaks."""
    from tests.integration.test_silver_cluster import driver

    proc = driver(cluster, root, model, "--dataset", "bench")
    t0 = time.perf_counter()

    def roots() -> dict[str, list[int]]:
        return {"driver": [proc.pid], **executors(cluster)}

    with PeakRss(roots) as rss:
        out, err = proc.communicate(timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cluster silver failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    assert all(o["committed"] for o in result["outcomes"]), result
    executor_peak = max((v for k, v in rss.peaks.items() if k != "driver"), default=0)
    return {
        "seconds": seconds,
        "driver_rss_mb": rss.peaks.get("driver", 0) / 1e6,
        "executor_rss_mb": executor_peak / 1e6,
    }


def local_runs(spark, lake, model: str, tenth: Path, work: Path) -> dict[str, float]:
    """Seconds of a full silver run on `lake`, then of a run over 10% new bronze rows."""
    from tasks.silver.job import build_silver
    from tasks.silver.plan import SilverJob, open_tokenizer, plan_silver

    _, info = open_tokenizer(model)
    job = SilverJob()
    t0 = time.perf_counter()
    full = build_silver(lake, plan_silver(lake, "bench", "xx", info), spark, job, {})
    full_s = time.perf_counter() - t0
    ingest_jsonl(lake, tenth, work, "bench", "xx")
    t0 = time.perf_counter()
    inc = build_silver(lake, plan_silver(lake, "bench", "xx", info), spark, job, {})
    inc_s = time.perf_counter() - t0
    assert len(inc) == 1 and all(o.committed for o in full + inc)
    return {"full": full_s, "incremental": inc_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="megabytes of text (4x data)")
    parser.add_argument("--model", default=None, help="tokenizer folder (default: tiny-t5)")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        from tasks.train.tiny_models import build_tiny_models

        args.model = str(build_tiny_models(ROOT / ".work" / "test-models")["t5"])
    from tasks.lakehouse.storage import open_lakehouse
    from tasks.silver.spark import parallelism, spark_session, stop_spark
    from tasks.silver.tokenize import load_tokenizer
    from tests.fixtures.spark import StandaloneCluster

    tok = load_tokenizer(args.model)
    texts = make_corpus(args.mb)
    tenth_texts = make_corpus(args.mb / 10, seed=8)
    tenth_texts = [f"new {i}\n{t}" for i, t in enumerate(tenth_texts)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-silver-"))
    quarter = len(texts) // 4
    lines: dict[str, object] = {"documents": len(texts), "megabytes": round(mb, 1)}
    try:
        # Bronze: four files (batches) in a 4x lakehouse, the first alone in a 1x one.
        files = []
        for i in range(4):
            files.append(work / f"part-{i}.jsonl")
            write_jsonl(files[-1], texts[i * quarter : (i + 1) * quarter])
        write_jsonl(work / "tenth.jsonl", tenth_texts)
        lakes = {name: work / name / "lake" for name in ("x1", "x4", "local")}
        t0 = time.perf_counter()
        for name, path in lakes.items():
            lake = open_lakehouse(str(path))
            for f in files[:1] if name == "x1" else files:
                ingest_jsonl(lake, f, work, "bench", "xx")
        lines["bronze_ingest_s"] = round(time.perf_counter() - t0, 1)
        texts = texts[: 4 * quarter]

        raw_s = bench_raw(tok, texts)
        backend_s = bench_backend_two_threads(tok, texts)
        ds_s = bench_datasets(args.model, texts, work)
        t0 = time.perf_counter()
        spark = spark_session("local[2]", driver_memory="2g")
        lines["spark_jvm_startup_s"] = round(time.perf_counter() - t0, 1)
        step = bench_spark_step(spark, texts, args.model, parallelism(spark) * 2)
        local = local_runs(
            spark, open_lakehouse(str(lakes["local"])), args.model, work / "tenth.jsonl", work
        )
        stop_spark()

        cluster = StandaloneCluster(work / "cluster")
        cluster.start()
        try:
            x1 = cluster_run(cluster, lakes["x1"], args.model)
            x4 = cluster_run(cluster, lakes["x4"], args.model)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = {
        "ratio_tokenize_step_vs_plain_tokenizer": raw_s / step["bare"],
        "ratio_tokenize_step_vs_datasets_map": ds_s / step["bare"],
        "ratio_job_local2_vs_encode_batch_fast_2_threads": backend_s / local["full"],
        "ratio_job_cluster_vs_encode_batch_fast_2_threads": backend_s / x4["seconds"],
        "ratio_driver_rss_4x_vs_1x": x4["driver_rss_mb"] / x1["driver_rss_mb"],
        "ratio_incremental_10pct_vs_full": local["incremental"] / local["full"],
    }
    goals = {
        "ratio_tokenize_step_vs_plain_tokenizer": (">=", 0.8),
        "ratio_tokenize_step_vs_datasets_map": (">=", 1.5),
        "ratio_job_local2_vs_encode_batch_fast_2_threads": (">=", 0.5),
        "ratio_job_cluster_vs_encode_batch_fast_2_threads": (">=", 0.5),
        "ratio_driver_rss_4x_vs_1x": ("<=", 1.2),
        "ratio_incremental_10pct_vs_full": ("<=", 0.2),
    }
    lines.update(
        {
            "cores": os.cpu_count(),
            "plain_tokenizer_mb_s": round(mb / raw_s, 2),
            "encode_batch_fast_2_threads_mb_s": round(mb / backend_s, 2),
            "datasets_map_num_proc2_mb_s": round(mb / ds_s, 2),
            "tokenize_step_mb_s": round(mb / step["bare"], 2),
            "spark_worker_warmup_s": round(step["warmup"], 1),
            "job_local2_mb_s": round(mb / local["full"], 2),
            "job_cluster_mb_s": round(mb / x4["seconds"], 2),
            "job_cluster_1x_s": round(x1["seconds"], 1),
            "incremental_10pct_s": round(local["incremental"], 1),
            "cluster_driver_peak_rss_1x_mb": round(x1["driver_rss_mb"]),
            "cluster_driver_peak_rss_4x_mb": round(x4["driver_rss_mb"]),
            "cluster_largest_executor_peak_rss_4x_mb": round(x4["executor_rss_mb"]),
        }
    )
    missed = []
    for name, value in ratios.items():
        op, goal = goals[name]
        ok = value >= goal if op == ">=" else value <= goal
        lines[name] = f"{value:.2f} (goal {op} {goal}: {'met' if ok else 'MISSED'})"
        missed += [] if ok else [name]
    for name, value in lines.items():
        print(f"{name}: {value}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
