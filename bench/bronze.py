"""Bronze ingestion benchmark: rows/s and peak RSS at N and 4N rows, ours vs a plain script.

`python -m bench.bronze [--rows N] [--chars C]` generates two jsonl files (N and 4N rows of about
C characters), then ingests each in a fresh subprocess:

- ours:  tasks.bronze.ingest (what the `ingest-unit` task runs): streaming `load_dataset`, lineage
         columns, Arrow blocks streamed into one Delta commit (application transaction) of a
         local lakehouse's bronze table;
- plain: `load_dataset("json", data_files=F, split="train").to_parquet(out)`.

Units in parallel: the 4N rows also as 4 shards of N rows, ingested by `ours` with 2 units at
once (threads, as the bronze flow's ThreadPoolTaskRunner with `source.concurrency=2`) vs the
plain script over the same shards (`bronze.shards.*`); the same units in a process pool of 2 are
reported beside them for comparison (`ours-c2-processes`: not what the flow runs).

All inputs are written (and synced) before the first case, each case's output is removed and
synced after it (untimed), and the 4N cases run `--repeats` times (default 3) in alternating
order; the median is reported, with every run's time beside it.

The shards also as parquet (CulturaX's format; row groups of 10,000 rows), ours at concurrency 2
vs the plain script with the parquet builder (`bronze.shards.parquet.*`, for information: the
goal is on the jsonl shards).

Peak RSS comes from os.wait4 on each child (its own ru_maxrss). Our peak at 4N must stay within
1.2x of N (flat memory); the exit status is 1 when it does not.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_LIMIT = 1.2
ONE_UNIT_GOAL = 0.7
WORDS = (
    "lakehouse bronze silver données texte modèle Sprache Daten palabra parola woord "
    "stream arrow parquet delta commit token span noise corpus web crawl"
).split()


def generate(path: Path, rows: int, chars: int, seed: int) -> None:
    """Write `rows` CulturaX-shaped json lines of about `chars` characters of text."""
    rng = random.Random(seed)
    pool = []  # distinct texts, cycled with a row number so every row differs
    for _ in range(997):
        words, n = [], 0
        while n < chars:
            w = rng.choice(WORDS)
            words.append(w)
            n += len(w) + 1
        pool.append(" ".join(words))
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(
                json.dumps(
                    {
                        "text": f"{i} {pool[i % len(pool)]}",
                        "timestamp": "2023-01-01",
                        "url": f"https://example.org/{seed}/{i}",
                        "source": "bench",
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def run_ours(src: Path, out: Path) -> int:
    """Ingest with the bronze code the Prefect task runs (no server: same work, no overhead)."""
    from bench import ingest_jsonl
    from tasks.lakehouse.storage import open_lakehouse

    outcome, committed = ingest_jsonl(open_lakehouse(str(out)), src, out, "json", "bench")
    assert committed and outcome.table_version is not None, outcome
    return outcome.rows


def _format(src: Path) -> str:
    """json or parquet: the format of the shards in folder `src` (or of file `src`)."""
    files = [src] if src.is_file() else sorted(src.iterdir())
    return "parquet" if files and files[0].suffix == ".parquet" else "json"


def run_ours_parallel(src: Path, out: Path, concurrency: int = 2, processes: bool = False) -> int:
    """The shards of folder `src` as units, `concurrency` at once (threads as the bronze flow
    runs them; `processes`: a process pool instead, measured for comparison only)."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from tasks.bronze import sources
    from tasks.lakehouse.storage import open_lakehouse

    fmt, lake = _format(src), open_lakehouse(str(out))
    units = sources.resolve_units(fmt, None, str(src), "train", None, None, lake)
    # As the bronze flow runs them: every unit in a pool of `concurrency` threads (the first
    # commits create the table; racing creators are resolved by the table layer).
    pool_type = ProcessPoolExecutor if processes else ThreadPoolExecutor
    n = len(units)
    with pool_type(concurrency) as pool:
        return sum(pool.map(_one_unit_rows, [str(src)] * n, [str(out)] * n, [fmt] * n, units))


def _one_unit_rows(src: str, out: str, fmt: str, unit) -> int:
    """One unit, in a pool thread or process (module level: picklable)."""
    from tasks.bronze import ingest as bronze
    from tasks.lakehouse.storage import open_lakehouse
    from tasks.params import SourceParams

    outcome = bronze.ingest_source_unit(
        open_lakehouse(out),
        unit,
        source=SourceParams(dataset=fmt, data_files=src),
        dataset_key=fmt,
        language="bench",
        token=None,
        max_rows=None,
        parameters={},
        work_dir=Path(out),
    )
    return outcome.rows


def run_plain(src: Path, out: Path) -> int:
    """The plain script a user would write."""
    import datasets

    fmt = _format(src)
    pattern = "*.parquet" if fmt == "parquet" else "*.jsonl"
    files = str(src / pattern) if src.is_dir() else str(src)
    ds = datasets.load_dataset(
        fmt, data_files=files, split="train", cache_dir=str(out / "hf-cache")
    )
    ds.to_parquet(str(out / "plain.parquet"))
    return ds.num_rows


def measure(case: str, src: Path, work: Path) -> dict[str, float]:
    """Run one case in a fresh subprocess; wall time and the child's own peak RSS."""
    out = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=work))
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "LAKEHOUSE_WORK_DIR": str(out),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bronze", "--child", case, str(src), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{case} on {src.name} failed (exit {status})")
    rows = int(stdout.strip().splitlines()[-1])
    # Not timed: the output goes, and what is still to be written reaches the disk now, not
    # in the next case's time.
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return {
        "rows": rows,
        "seconds": wall,
        "rows_per_s": rows / wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bronze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rows", type=int, default=int(os.environ.get("BENCH_BRONZE_ROWS", 200_000))
    )
    parser.add_argument("--chars", type=int, default=500, help="text length per row")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each 4N case (the median is reported)"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        case, src, out = args.child
        run = {
            "ours": run_ours,
            "ours-c2": run_ours_parallel,
            "ours-c2-processes": functools.partial(run_ours_parallel, processes=True),
        }.get(case, run_plain)
        rows = run(Path(src), Path(out))
        print(rows, flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-bronze-", dir=args.work) as tmp:
        work = Path(tmp)
        sizes = {"N": args.rows, "4N": 4 * args.rows}
        files = {}
        t0 = time.perf_counter()
        for label, rows in sizes.items():
            files[label] = work / f"rows-{label}.jsonl"
            generate(files[label], rows, args.chars, seed=rows)
        shards = work / "shards-4N"
        shards.mkdir()
        for i in range(4):
            generate(shards / f"part-{i:05d}.jsonl", args.rows, args.chars, seed=10 + i)
        # The same shards as parquet (CulturaX's own format), row groups of 10,000 rows.
        import pyarrow.json as paj
        import pyarrow.parquet as pq

        pq_shards = work / "shards-4N-parquet"
        pq_shards.mkdir()
        for shard in sorted(shards.iterdir()):
            pq.write_table(
                paj.read_json(shard), pq_shards / f"{shard.stem}.parquet", row_group_size=10_000
            )
        # Every input on disk before the first case: no case pays for another's writeback.
        os.sync()
        print(f"bronze.N: {args.rows}")
        print(f"bronze.chars_per_row: {args.chars}")
        print(f"bronze.source_mb_4N: {files['4N'].stat().st_size / 2**20:.1f}")
        print(f"bronze.generate_s: {time.perf_counter() - t0:.1f}")
        print(f"bronze.repeats: {args.repeats} (median seconds; cases alternate in order)")
        results: dict[tuple[str, str], dict[str, float]] = {}
        for case in ("ours", "plain"):
            for label in sizes:
                r = measure(case, files[label], work)
                assert r["rows"] == sizes[label], (case, label, r["rows"])
                results[case, label] = r
        speed_runs: dict[str, list[float]] = {"ours": [results["ours", "4N"]["seconds"]]}
        speed_runs["plain"] = [results["plain", "4N"]["seconds"]]
        cases = {
            "ours-c2": ("ours-c2", shards),
            "plain": ("plain", shards),
            "ours-c2-processes": ("ours-c2-processes", shards),
            "parquet.ours-c2": ("ours-c2", pq_shards),
            "parquet.plain": ("plain", pq_shards),
        }
        shard_runs: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(args.repeats):
            # Alternate the order so drift on a shared machine falls on every case alike.
            for name in list(cases) if rep % 2 == 0 else list(cases)[::-1]:
                case, src = cases[name]
                r = measure(case, src, work)
                assert r["rows"] == 4 * args.rows, (name, r["rows"])
                shard_runs[name].append(r["seconds"])
            if rep + 1 < args.repeats:
                for case in ("ours", "plain") if rep % 2 else ("plain", "ours"):
                    speed_runs[case].append(measure(case, files["4N"], work)["seconds"])
        for case in ("ours", "plain"):
            for label in sizes:
                r = results[case, label]
                if label == "4N":
                    r["seconds"] = statistics.median(speed_runs[case])
                    r["rows_per_s"] = r["rows"] / r["seconds"]
                print(f"bronze.{case}.{label}.seconds: {r['seconds']:.2f}")
                print(f"bronze.{case}.{label}.rows_per_s: {r['rows_per_s']:.0f}")
                print(f"bronze.{case}.{label}.peak_rss_mb: {r['peak_rss_mb']:.0f}")
        ratio = results["ours", "4N"]["peak_rss_mb"] / results["ours", "N"]["peak_rss_mb"]
        plain_ratio = results["plain", "4N"]["peak_rss_mb"] / results["plain", "N"]["peak_rss_mb"]
        speed = results["ours", "4N"]["rows_per_s"] / results["plain", "4N"]["rows_per_s"]
        print(f"bronze.ours.rss_ratio_4N_over_N: {ratio:.3f}")
        print(f"bronze.plain.rss_ratio_4N_over_N: {plain_ratio:.3f}")
        print(f"bronze.ours_over_plain.rows_per_s_4N: {speed:.3f} (goal >= {ONE_UNIT_GOAL})")
        par = {case: statistics.median(runs) for case, runs in shard_runs.items()}
        for case, seconds in par.items():
            print(f"bronze.shards.{case}.seconds: {seconds:.2f} ({_runs(shard_runs[case])})")
            print(f"bronze.shards.{case}.rows_per_s: {4 * args.rows / seconds:.0f}")
        speed_c2 = par["plain"] / par["ours-c2"]
        print(f"bronze.shards.ours_c2_over_plain.rows_per_s_4N: {speed_c2:.3f} (goal >= 1.0)")
        speed_pq = par["parquet.plain"] / par["parquet.ours-c2"]
        print(
            "bronze.shards.parquet.ours_c2_over_plain.rows_per_s_4N: "
            f"{speed_pq:.3f} (the same shards as parquet, for information)"
        )
        speed_p = par["plain"] / par["ours-c2-processes"]
        print(
            "bronze.shards.ours_c2_processes_over_plain.rows_per_s_4N: "
            f"{speed_p:.3f} (a process pool: not the flow's runner, for comparison)"
        )
        ok = ratio <= RSS_LIMIT
        print(f"bronze.flat_memory_ok: {ok} (limit {RSS_LIMIT}x)")
        return 0 if ok else 1


def _runs(seconds: list[float]) -> str:
    return "runs " + ", ".join(f"{s:.2f}" for s in seconds)


if __name__ == "__main__":
    sys.exit(main())
