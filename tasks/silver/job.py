"""Silver: clean, deduplicate and tokenize the bronze batches that are not in silver yet.

One Spark job handles every pending bronze batch of the pinned bronze version (Spark reads
that version's files as parquet), then the driver commits one silver batch per bronze batch in
bronze commit order (tasks.silver.commit). On an Azure lakehouse without `direct_io` the inputs
are staged to local disk first.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.lakehouse.delta import (
    live_files,
)
from tasks.lakehouse.storage import Lakehouse
from tasks.silver.commit import (
    BatchOutcome,
    commit_batch_parts,
    ensure_tables,
    finalize_batch,
    spark_rows,
)
from tasks.silver.plan import SilverError, SilverJob, SilverPlan, params_key, silver_batch_id
from tasks.silver.transform import run_spark_job, write_table_parts

log = logging.getLogger(__name__)


def abfss_uri(lake: Lakehouse, rel: str) -> str:
    """abfss://container@account.dfs.core.windows.net/path for Spark with hadoop-azure."""
    account = getattr(lake.fs, "account_name", None)
    container, _, path = lake.path(rel).partition("/")
    if not account:
        raise SilverError(
            "transform.direct_io=true needs the storage account name in the "
            "lakehouse block (account URL or connection string)"
        )
    return f"abfss://{container}@{account}.dfs.core.windows.net/{path}"


def build_silver(
    lake: Lakehouse,
    plan: SilverPlan,
    spark: Any,
    job: SilverJob,
    work_dir: Path,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None = None,
) -> list[BatchOutcome]:
    """Process every pending bronze batch in one Spark job and commit one silver batch each."""
    from tasks.silver.spark import parallelism

    if not plan.pending:
        return []
    key = params_key(
        job.rules,
        dedupe=job.dedupe,
        max_tokens=job.max_tokens,
        text_column=job.text_column,
        target_column=job.target_column,
        fingerprint=plan.tokenizer.fingerprint,
    )
    if lake.is_local and not job.direct_io:
        return _build_in_place(lake, plan, spark, job, key, parameters, on_commit)
    work = Path(work_dir) / f"silver-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    remote_stage: str | None = None
    try:
        inputs = _stage_inputs(lake, plan, work, job.direct_io)
        old = _stage_old_hashes(lake, plan, work, job.direct_io) if job.dedupe else []
        if job.direct_io:
            remote_stage = f"{plan.table}/_work/{work.name}"
            out, opener = abfss_uri(lake, remote_stage), lake.open
        else:
            out, opener = str((work / "spark").resolve()), functools.partial(open, mode="rb")
        total_rows = sum(m.rows for m in plan.pending)
        if inputs and total_rows:
            slices = max(1, min(parallelism(spark) * 2, -(-total_rows // 2000)))
            log.info(
                "silver: %d bronze batch(es), %d rows, %d old silver file(s), %d slices",
                len(plan.pending),
                total_rows,
                len(old),
                slices,
            )
            started = time.perf_counter()
            run_spark_job(spark, inputs, old, out, job, plan.tokenizer, plan.ranks, slices)
            log.info("silver: Spark job took %.1fs", time.perf_counter() - started)
        started = time.perf_counter()
        outcomes = []
        for m in plan.pending:  # bronze commit order
            files = _stage_outputs(lake, out, m.batch_id, remote_stage)
            rows = (
                spark_rows(files, opener)
                if m.rows
                else pa.table(
                    {"_row_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}
                )
            )
            outcomes.append(finalize_batch(lake, plan, m, rows, job, key, parameters, on_commit))
        log.info(
            "silver: writing and committing %d batch(es) took %.1fs",
            len(outcomes),
            time.perf_counter() - started,
        )
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if remote_stage:
            lake.rm(remote_stage)


def _build_in_place(
    lake: Lakehouse,
    plan: SilverPlan,
    spark: Any,
    job: SilverJob,
    key: str,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None,
) -> list[BatchOutcome]:
    """Local (or shared-mount) lakehouse: executors read bronze and write the parts into the
    tables' folders; the driver gets file reports only and commits them per bronze batch."""
    from tasks.silver.spark import parallelism

    ensure_tables(lake, plan, job.target_column is not None)
    inputs = _stage_inputs(lake, plan, Path("."), False)
    old = _stage_old_hashes(lake, plan, Path("."), False) if job.dedupe else []
    total_rows = sum(m.rows for m in plan.pending)
    reports: list[dict[str, Any]] = []
    if inputs and total_rows:
        # Slices of about rows_per_part rows (executor memory bounded by the partition size),
        # at least two per core so every executor has work.
        slices = max(1, min(parallelism(spark) * 2, -(-total_rows // 2000)))
        slices = max(slices, -(-total_rows // job.rows_per_part))
        log.info(
            "silver: %d bronze batch(es), %d rows, %d old silver file(s), %d slices, "
            "executors write the parts",
            len(plan.pending),
            total_rows,
            len(old),
            slices,
        )
        started = time.perf_counter()
        reports = write_table_parts(
            spark,
            inputs,
            old,
            job,
            plan.tokenizer,
            plan.ranks,
            slices,
            silver_dir=str(lake.local_path(plan.table).resolve()),
            rejected_dir=str(lake.local_path(plan.rejected_table).resolve()),
            batch_ids={m.batch_id: silver_batch_id(m.batch_id, key) for m in plan.pending},
        )
        log.info(
            "silver: Spark job took %.1fs, %d part file(s)",
            time.perf_counter() - started,
            len(reports),
        )
    started = time.perf_counter()
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        by_batch.setdefault(r["bronze_batch_id"], []).append(r)
    outcomes = [
        commit_batch_parts(
            lake, plan, m, by_batch.get(m.batch_id, []), job, key, parameters, on_commit
        )
        for m in plan.pending  # bronze commit order
    ]
    log.info(
        "silver: committing %d batch(es) took %.1fs",
        len(outcomes),
        time.perf_counter() - started,
    )
    return outcomes


def _spark_paths(lake: Lakehouse, files: list[str], direct_io: bool, stage) -> list[str]:
    """Paths Spark reads for a table version's live files (never a folder glob).

    Local lakehouse: the files in place; `direct_io`: abfss:// URIs; otherwise
    `stage(rel)` copies the file into the work folder and returns its local path.
    """
    paths = []
    for uri in files:
        if lake.is_local:
            paths.append(uri.removeprefix("file://"))
            continue
        rel = lake.rel(uri)
        paths.append(abfss_uri(lake, rel) if direct_io else str(stage(rel).resolve()))
    return paths


def _stage_inputs(lake: Lakehouse, plan: SilverPlan, work: Path, direct_io: bool) -> list[str]:
    """Paths of the pinned bronze version's files (Spark keeps the pending batches' rows)."""

    def stage(rel: str) -> Path:
        local = work / "bronze" / rel.replace("/", "_")
        lake.get_file(rel, local)
        return local

    files = live_files(
        lake.table_uri(plan.bronze_table),
        storage_options=lake.storage_options,
        version=plan.bronze_version,
    )
    return _spark_paths(lake, files, direct_io, stage)


def _stage_old_hashes(lake: Lakehouse, plan: SilverPlan, work: Path, direct_io: bool) -> list[str]:
    """Files holding the committed silver rows' _text_hash (and _row_id)."""

    def stage(rel: str) -> Path:
        # Only the two small columns travel, not the token ids.
        with lake.open(rel) as fh:
            table = pq.read_table(fh, columns=["_row_id", "_text_hash"])
        local = work / "hashes" / rel.replace("/", "_")
        local.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, local)
        return local

    files = live_files(lake.table_uri(plan.table), storage_options=lake.storage_options)
    return _spark_paths(lake, files, direct_io, stage)


def _stage_outputs(
    lake: Lakehouse, out: str, bronze_id: str, remote_stage: str | None
) -> list[str]:
    """Spark's output files for one bronze batch."""
    part = f"_bronze_batch_id={bronze_id}"
    if remote_stage is None:
        folder = Path(out) / part
        return sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
    return [f for f in lake.find(f"{remote_stage}/{part}") if f.endswith(".parquet")]
