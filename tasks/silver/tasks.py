"""Prefect tasks of the silver layer: thin wrappers over tasks.silver.job (URIs and scalars in)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.bronze.ingest import default_work_dir
from tasks.lakehouse.layout import bronze_dir, silver_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES
from tasks.silver import job as silver


def _pending(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    tokenizer: str,
    revision: str | None,
    text_column: str,
    target_column: str | None,
):
    """(lakehouse, silver plan), the pending batches' columns checked."""
    lake = open_lakehouse(root, block)
    _, info = silver.open_tokenizer(tokenizer, revision, language)
    plan = silver.plan_silver(lake, dataset_key, language, info)
    silver.check_columns(lake, plan.pending, text_column, target_column)
    return lake, plan


@task(name="plan-silver", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def plan_silver(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    tokenizer: str,
    revision: str | None,
    text_column: str,
    target_column: str | None,
) -> dict[str, Any]:
    """Which committed bronze batches are not in this tokenizer's silver table yet."""
    lake, plan = _pending(
        root, block, dataset_key, language, tokenizer, revision, text_column, target_column
    )
    return {
        "pending": [m.batch_id for m in plan.pending],
        "pending_rows": sum(m.rows for m in plan.pending),
        "bronze_batches": plan.bronze_batches,
        "silver_batches": len(plan.done),
        "uri": lake.uri(plan.table),
        "bronze_uri": lake.uri(bronze_dir(dataset_key, language)),
        "tokenizer_key": plan.tokenizer.key,
        "tokenizer_fingerprint": plan.tokenizer.fingerprint,
    }


# The lakehouse state is the cache: re-running finds committed batches and skips them, so a
# Prefect result cache would only hide new bronze batches.
@task(name="build-silver", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def build_silver(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    tokenizer: str,
    revision: str | None,
    text_column: str,
    target_column: str | None,
    transform: dict[str, Any],
    parameters: dict[str, Any],
) -> list[dict[str, Any]]:
    """Clean, dedupe and tokenize every pending bronze batch with Spark; commit each."""
    from tasks.silver.spark import spark_session

    logger = get_run_logger()
    # Planned again: a concurrent run may have committed batches since plan-silver.
    lake, plan = _pending(
        root, block, dataset_key, language, tokenizer, revision, text_column, target_column
    )
    if not plan.pending:  # a concurrent run got there first
        return []
    logger.info("building silver from bronze %s", ", ".join(m.batch_id for m in plan.pending))
    spark = spark_session(
        transform.get("spark_master", "local[*]"),
        transform.get("spark_remote"),
        transform.get("spark_driver_memory", "2g"),
    )
    job = silver.SilverJob.from_params(text_column, target_column, transform)
    outcomes = silver.build_silver(lake, plan, spark, job, default_work_dir(), parameters)
    for o in outcomes:
        logger.info(
            "%s bronze %s: %d rows in, %d to silver, rejected %s -> %s",
            "committed" if o.committed else "already committed",
            o.bronze_batch_id,
            o.bronze_rows,
            o.rows,
            o.rejected or "none",
            o.uri,
        )
    return [o.to_dict() for o in outcomes]


@task(name="publish-silver", cache_policy=NO_CACHE)
def publish_silver(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    tokenizer_key: str,
    tokenizer: str,
    batches: list[dict[str, Any]],
) -> None:
    """Emit lakehouse.silver.committed and a table artifact of rows and rejects per batch."""
    committed = [b for b in batches if b["committed"]]
    if not committed:
        return
    lake = open_lakehouse(root, block)
    table_uri = lake.uri(silver_dir(dataset_key, language, tokenizer_key))
    emit_event(
        event="lakehouse.silver.committed",
        resource={
            "prefect.resource.id": f"lakehouse.silver.{dataset_key}.{language}",
            "prefect.resource.name": f"silver {dataset_key}/{language}/{tokenizer_key}",
        },
        payload={
            "batch_ids": [b["batch_id"] for b in committed],
            "uris": [b["uri"] for b in committed],
            "parent_batch_ids": [b["bronze_batch_id"] for b in committed],
            "rows": sum(b["rows"] for b in committed),
            "tokenizer": tokenizer_key,
            "tokenizer_name": tokenizer,
            "table": table_uri,
        },
    )
    reasons = sorted(
        {r for b in committed for r in b["rejected"]},
        key=lambda r: silver.REASONS.index(r) if r in silver.REASONS else 99,
    )
    create_table_artifact(
        key=artifact_key("silver", dataset_key, language),
        table=[
            {
                "batch": b["batch_id"],
                "bronze_batch": b["bronze_batch_id"],
                "rows_in": b["bronze_rows"],
                "rows_out": b["rows"],
                "rejected": sum(b["rejected"].values()),
                **{r: b["rejected"].get(r, 0) for r in reasons},
            }
            for b in committed
        ],
        description=f"Silver batches committed to {table_uri} (rows in, out, rejects by reason)",
    )
