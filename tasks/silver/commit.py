"""Committing one bronze batch's silver parts: rejected first, silver last.

The executors wrote the parts (tasks.silver.parts); the driver commits what their reports name.
Every bronze row lands in exactly one of the two tables, so silver rows + rejected rows =
bronze rows; a batch that would break that is refused before anything is committed. Both commits
carry the batch's application transaction, so a crash between them is recovered without
committing the rejected rows twice.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.lakehouse.batches import Batch
from tasks.lakehouse.delta import (
    BATCH_META,
    TableError,
    append_batch,
)
from tasks.lakehouse.storage import Lakehouse
from tasks.lakehouse.tables import AddedFile, commit_files, ensure_table
from tasks.silver.parts import conformed, rejected_schema, silver_schema
from tasks.silver.plan import (
    SilverError,
    SilverJob,
    SilverPlan,
    silver_app_id,
    silver_batch_id,
)


@dataclass
class BatchOutcome:
    """What silver did with one bronze batch."""

    batch_id: str
    bronze_batch_id: str
    bronze_rows: int
    rows: int
    rejected: dict[str, int]
    committed: bool
    version: int | None = None  # silver table version of the commit


def _metadata(
    plan: SilverPlan,
    bronze: Batch,
    batch_id: str,
    key: str,
    counts: dict[str, int],
    parameters: dict[str, Any],
) -> dict[str, str]:
    """Commit metadata of a silver (and rejected) batch: lineage, tokenizer, parameters."""
    return {
        BATCH_META: batch_id,
        "lakehouse.bronze_batch_id": bronze.batch_id,
        "lakehouse.bronze_version": str(plan.bronze_version),
        "lakehouse.tokenizer": plan.tokenizer.name,
        "lakehouse.tokenizer_fingerprint": plan.tokenizer.fingerprint,
        "lakehouse.tokenizer_src_lang": str(plan.tokenizer.src_lang),
        "lakehouse.tokenizer_tgt_lang": str(plan.tokenizer.tgt_lang),
        "lakehouse.params_key": key,
        "lakehouse.rejected": json.dumps(counts),
        **{f"lakehouse.param.{k}": str(v) for k, v in parameters.items()},
    }


def ensure_tables(lake: Lakehouse, plan: SilverPlan, has_target: bool) -> None:
    """Create the silver and rejected tables (fixed schemas) before executors write into them."""
    opts = lake.storage_options
    ensure_table(
        lake.table_uri(plan.rejected_table),
        schema=rejected_schema(has_target),
        storage_options=opts,
    )
    ensure_table(lake.table_uri(plan.table), schema=silver_schema(has_target), storage_options=opts)


def commit_batch_parts(
    lake: Lakehouse,
    plan: SilverPlan,
    bronze: Batch,
    reports: list[dict[str, Any]],
    job: SilverJob,
    key: str,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None = None,
) -> BatchOutcome:
    """Commit the parts that executors wrote for one bronze batch: rejected first, then silver.

    `reports` are the file reports of the batch's successful tasks (tasks.silver.parts): only
    metadata reaches the driver, never rows. The counts are checked (silver + rejected = bronze
    rows) before anything is committed; both commits carry the batch's application transaction.
    """
    has_target = job.target_column is not None
    batch_id = silver_batch_id(bronze.batch_id, key)
    by_kind: dict[str, list[dict[str, Any]]] = {"silver": [], "rejected": []}
    for r in sorted(reports, key=lambda r: (r["first_row_id"] or "", r["path"])):
        by_kind[r["kind"]].append(r)
    n_good = sum(r["rows"] for r in by_kind["silver"])
    n_bad = sum(r["rows"] for r in by_kind["rejected"])
    counts: Counter[str] = Counter()
    for r in by_kind["rejected"]:
        counts.update(json.loads(r["rejected"] or "{}"))
    counts_sorted = dict(sorted(counts.items()))
    if n_good + n_bad != bronze.rows or sum(counts.values()) != n_bad:
        raise SilverError(
            f"bronze batch {bronze.batch_id}: {bronze.rows} rows in bronze, but silver "
            f"produced {n_good} + {n_bad} rejected. Its files may have been "
            f"changed after commit: check {lake.uri(plan.bronze_table)}."
        )
    app_id, opts = silver_app_id(bronze.batch_id), lake.storage_options
    metadata = _metadata(plan, bronze, batch_id, key, counts_sorted, parameters)
    targets = (
        ("rejected", plan.rejected_table, rejected_schema(has_target), metadata),
        (
            "silver",
            plan.table,
            silver_schema(has_target),
            {**metadata, "lakehouse.rejected_table": lake.uri(plan.rejected_table)},
        ),
    )
    outcome = None
    for kind, table, schema, meta in targets:
        files = by_kind[kind]
        if files:
            try:
                outcome = commit_files(
                    lake.table_uri(table),
                    [AddedFile(path=r["path"], size=r["size"], rows=r["rows"]) for r in files],
                    schema=schema,
                    app_id=app_id,
                    version=1,
                    writer_token=uuid.uuid4().hex,
                    metadata=meta,
                    storage_options=opts,
                )
            except TableError as exc:
                where = lake.uri(table)
                if where in str(exc):
                    raise
                raise TableError(f"{where}: {exc}", retryable=exc.retryable) from None
        else:  # nothing of this kind: an empty commit still records the transaction
            outcome = append_batch(
                lake.table_uri(table),
                conformed(pa.table({"_row_id": pa.array([], pa.string())}), schema),
                app_id=app_id,
                version=1,
                metadata=meta,
                storage_options=opts,
                where=lake.uri(table),
            )
        if on_commit:
            on_commit(kind, batch_id)
    assert outcome is not None
    return BatchOutcome(
        batch_id=batch_id,
        bronze_batch_id=bronze.batch_id,
        bronze_rows=bronze.rows,
        rows=n_good,
        rejected=counts_sorted,
        committed=outcome.committed,
        version=outcome.table_version,
    )
