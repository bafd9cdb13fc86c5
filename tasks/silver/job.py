"""Silver: clean, deduplicate and tokenize the bronze batches that are not in silver yet.

One Spark job handles every pending bronze batch of the pinned bronze version: the executors
read that version's files and write the silver and rejected parts into the tables' folders (a
local path every worker sees, or the Azure container through adlfs with a short-lived
container SAS: tasks.silver.blob_io). The driver gets file reports only and commits one silver
batch per bronze batch, in bronze commit order (tasks.silver.commit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tasks.lakehouse.delta import live_files
from tasks.lakehouse.storage import Lakehouse
from tasks.silver.blob_io import executor_access
from tasks.silver.commit import BatchOutcome, commit_batch_parts, ensure_tables
from tasks.silver.plan import SilverJob, SilverPlan, params_key, silver_batch_id
from tasks.silver.transform import write_table_parts

log = logging.getLogger(__name__)


def build_silver(
    lake: Lakehouse,
    plan: SilverPlan,
    spark: Any,
    job: SilverJob,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None = None,
) -> list[BatchOutcome]:
    """Process every pending bronze batch in one Spark job and commit one silver batch each.

    The executors read bronze and write the parts; the driver receives only the reports of
    the successful tasks' files (never rows: its memory does not grow with the data) and
    commits them per bronze batch.
    """
    from tasks.silver.spark import is_connect, parallelism

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
    ensure_tables(lake, plan, job.target_column is not None)
    inputs = _executor_paths(
        lake,
        live_files(
            lake.table_uri(plan.bronze_table),
            storage_options=lake.storage_options,
            version=plan.bronze_version,
        ),
    )
    old: list[str] = []
    if job.dedupe:  # the committed silver rows' files: executors read their _text_hash
        old = _executor_paths(
            lake, live_files(lake.table_uri(plan.table), storage_options=lake.storage_options)
        )
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
        access, shared = None, None
        if not lake.is_local:
            container = lake.path().split("/", 1)[0]
            connect = is_connect(spark)
            access = executor_access(
                lake.storage_options, container, minutes=job.sas_minutes, with_sas=not connect
            )
            if not connect:  # the SAS travels as a broadcast, not in the closure
                access = shared = spark.sparkContext.broadcast(access)
        try:
            reports = write_table_parts(
                spark,
                inputs,
                old,
                job,
                plan.tokenizer,
                plan.ranks,
                slices,
                silver_dir=_folder(lake, plan.table),
                rejected_dir=_folder(lake, plan.rejected_table),
                batch_ids={m.batch_id: silver_batch_id(m.batch_id, key) for m in plan.pending},
                access=access,
            )
        finally:
            if shared is not None:
                shared.destroy()
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


def _folder(lake: Lakehouse, rel: str) -> str:
    """A table's folder as the executors name it: a local path, or `container/path`."""
    return str(lake.local_path(rel).resolve()) if lake.is_local else lake.path(rel)


def _executor_paths(lake: Lakehouse, files: list[str]) -> list[str]:
    """A table version's live files as the executors open them (never a folder glob)."""
    if lake.is_local:
        return [uri.removeprefix("file://") for uri in files]
    return [lake.path(lake.rel(uri)) for uri in files]
