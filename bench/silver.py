"""Silver benchmark: Spark's tokenize step vs the bare tokenizer and `datasets.map`, and the
cost of an incremental run.

`python -m bench.silver [--rows N] [--master local[2]] [--model DIR]` builds N rows from the
shipped CulturaX sample (each row made unique), then, on the same texts, in one process:

- raw:      the fast tokenizer batch-encoding with all cores (TOKENIZERS_PARALLELISM=true);
- datasets: `Dataset.map(tokenize, batched=True, num_proc=2)`;
- silver:   silver's tokenize step, `mapInArrow` over Arrow batches in the Spark workers (warm
            JVM and workers; the JVM start and the first-worker warm-up are reported apart),
            bare (`encode_partition`) and as silver runs it (`tokenize_partition`: clean, hash
            and tokenize);
- full vs incremental: a whole silver run (read, clean, tokenize, dedupe, write, commit) over
  N bronze rows, then one over 10% new bronze rows on top of it.

Goals: silver tokenize >= 0.8x raw, >= 1.5x datasets; incremental <= 25% of full. Prints
`name: value` lines; exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "culturax"
WORDS = (
    "lakehouse bronze silver données texte modèle Sprache Daten palabra parola woord "
    "stream arrow parquet delta commit token corpus web crawl"
).split()


def make_texts(rows: int) -> list[str]:
    """`rows` distinct texts: the sample's texts, each cycle tagged with different words."""
    base = []
    for path in sorted(SAMPLE.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            base += [json.loads(line)["text"] for line in fh]
    out = []
    for i in range(rows):
        cycle = i // len(base)
        tag = f"{WORDS[cycle % len(WORDS)]} {WORDS[(cycle // len(WORDS)) % len(WORDS)]}"
        out.append(f"{base[i % len(base)]}\n{tag} {cycle}")
    return out


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def ingest(lake, path: Path, work: Path):
    """One jsonl file into the bronze Delta table, with the code the bronze task runs."""
    from tasks.bronze import ingest as bronze
    from tasks.bronze import sources
    from tasks.params import SourceParams

    [unit] = sources.resolve_units("json", None, str(path), "train", None, None, lake)
    outcome = bronze.ingest_source_unit(
        lake,
        unit,
        source=SourceParams(dataset="json", data_files=str(path)),
        dataset_key="bench",
        language="xx",
        token=None,
        max_rows=None,
        parameters={},
        work_dir=work,
    )
    assert outcome.committed, outcome.message
    return outcome


def bench_raw(tok, texts: list[str]) -> float:
    """Seconds for the bare fast tokenizer, batch-encoding with its own thread pool."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0 = time.perf_counter()
    for i in range(0, len(texts), 10_000):
        tok(texts[i : i + 10_000], return_attention_mask=False)
    seconds = time.perf_counter() - t0
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return seconds


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


def bench_spark_step(
    spark, texts: list[str], model: str, slices: int, batch_size: int
) -> dict[str, float]:
    """Seconds for silver's mapInArrow steps over cached input (noop sink: compute only)."""
    import pyarrow as pa

    from tasks.silver.cleaning import CleaningRules
    from tasks.silver.tokenize import encode_partition, output_schema, spark_ddl, tokenize_partition

    table = pa.table(
        {
            "_row_id": [f"r{i:010d}" for i in range(len(texts))],
            "_bronze_batch_id": ["b"] * len(texts),
            "text": texts,
        }
    )
    df = spark.createDataFrame(table).repartition(slices).cache()
    df.count()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    bare = functools.partial(encode_partition, tokenizer=model)
    full = functools.partial(
        tokenize_partition,
        tokenizer=model,
        revision=None,
        rules=CleaningRules(min_chars=0, min_letter_ratio=0.0).to_dict(),
        has_target=False,
        max_tokens=None,
        ranks={"b": 0},
    )

    def run(fn, ddl, rows=None) -> float:
        src = df.limit(rows) if rows else df
        t0 = time.perf_counter()
        src.mapInArrow(fn, ddl).write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t0

    out = {"warmup": run(bare, "_row_id string, input_ids array<int>", rows=slices * 10)}
    out["bare"] = run(bare, "_row_id string, input_ids array<int>")
    out["clean_tokenize"] = run(full, spark_ddl(output_schema(False)))
    df.unpersist()
    return out


def bench_runs(spark, texts: list[str], model: str, work: Path) -> dict[str, float]:
    """Seconds for a full silver run over all texts, then for 10% new bronze on top."""
    from tasks.lakehouse.storage import open_lakehouse
    from tasks.silver.job import build_silver
    from tasks.silver.plan import SilverJob, open_tokenizer, plan_silver

    lake = open_lakehouse(str(work / "lake"))
    _, info = open_tokenizer(model)
    job = SilverJob()
    write_jsonl(work / "full.jsonl", texts)
    ingest(lake, work / "full.jsonl", work)
    t0 = time.perf_counter()
    full = build_silver(lake, plan_silver(lake, "bench", "xx", info), spark, job, {})
    full_s = time.perf_counter() - t0
    tenth = make_texts(len(texts) + len(texts) // 10)[len(texts) :]
    write_jsonl(work / "tenth.jsonl", tenth)
    ingest(lake, work / "tenth.jsonl", work)
    t0 = time.perf_counter()
    inc = build_silver(lake, plan_silver(lake, "bench", "xx", info), spark, job, {})
    inc_s = time.perf_counter() - t0
    assert [o.bronze_rows for o in inc] == [len(tenth)]
    return {"full": full_s, "incremental": inc_s, "full_rows": sum(o.rows for o in full)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="rows of text")
    parser.add_argument("--master", default="local[2]", help="Spark master (local[N])")
    parser.add_argument("--model", default=None, help="tokenizer folder (default: tiny-t5)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per Arrow batch")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.model is None:
        from tasks.train.tiny_models import build_tiny_models

        args.model = str(build_tiny_models(ROOT / ".work" / "test-models")["t5"])
    from tasks.silver.tokenize import load_tokenizer

    tok = load_tokenizer(args.model)
    texts = make_texts(args.rows)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-silver-"))
    try:
        raw_s = bench_raw(tok, texts)
        ds_s = bench_datasets(args.model, texts, work)

        from tasks.silver.spark import parallelism, spark_session

        t0 = time.perf_counter()
        spark = spark_session(args.master, driver_memory="2g")
        jvm_s = time.perf_counter() - t0
        slices = parallelism(spark) * 2
        step = bench_spark_step(spark, texts, args.model, slices, args.batch_size)
        runs = bench_runs(spark, texts, args.model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio_raw = raw_s / step["bare"]
    ratio_ds = ds_s / step["bare"]
    ratio_inc = runs["incremental"] / runs["full"]
    lines = {
        "rows": args.rows,
        "megabytes": round(mb, 2),
        "cores": os.cpu_count(),
        "spark_master": args.master,
        "spark_jvm_startup_s": round(jvm_s, 2),
        "spark_worker_warmup_s": round(step["warmup"], 2),
        "raw_tokenizer_mb_s": round(mb / raw_s, 3),
        "datasets_map_num_proc2_mb_s": round(mb / ds_s, 3),
        "silver_tokenize_step_mb_s": round(mb / step["bare"], 3),
        "silver_clean_tokenize_step_mb_s": round(mb / step["clean_tokenize"], 3),
        "ratio_silver_vs_raw": round(ratio_raw, 3),
        "ratio_silver_vs_datasets": round(ratio_ds, 3),
        "ratio_silver_clean_tokenize_vs_raw": round(raw_s / step["clean_tokenize"], 3),
        "silver_full_run_s": round(runs["full"], 2),
        "silver_full_run_mb_s": round(mb / runs["full"], 3),
        "silver_incremental_10pct_run_s": round(runs["incremental"], 2),
        "ratio_incremental_vs_full": round(ratio_inc, 3),
        "goal_silver_vs_raw_0.8": ratio_raw >= 0.8,
        "goal_silver_vs_datasets_1.5": ratio_ds >= 1.5,
        "goal_incremental_le_0.25": ratio_inc <= 0.25,
    }
    for name, value in lines.items():
        print(f"{name}: {value}", flush=True)
    return 0 if ratio_raw >= 0.8 and ratio_ds >= 1.5 and ratio_inc <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
