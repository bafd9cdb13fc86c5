"""Prefect tasks of the silver layer: thin wrappers over tasks.silver.job."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import Lakehouse, open_lakehouse
from tasks.params import LakehouseParams, ModelParams, SourceParams, TransformParams
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES
from tasks.silver.cleaning import REASONS
from tasks.silver.commit import BatchOutcome
from tasks.silver.job import build_silver
from tasks.silver.plan import SilverJob, SilverPlan, check_columns, open_tokenizer, plan_silver


@dataclass(frozen=True)
class SilverPlanSummary:
    """What plan-silver found: pending bronze batches and where silver goes."""

    pending: list[str]
    pending_rows: int
    bronze_batches: int
    bronze_version: int | None
    uri: str
    bronze_uri: str
    tokenizer_key: str


def _plan(
    lakehouse: LakehouseParams, source: SourceParams, model: ModelParams
) -> tuple[Lakehouse, SilverPlan]:
    """(lakehouse, silver plan), the pending batches' columns checked."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    _, info = open_tokenizer(model.name_or_path, model.revision, source.language_key)
    plan = plan_silver(lake, source.dataset_key, source.language_key, info)
    check_columns(lake, plan, source.text_column, source.target_column)
    return lake, plan


@task(name="plan-silver", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def find_pending_bronze(
    *, lakehouse: LakehouseParams, source: SourceParams, model: ModelParams
) -> SilverPlanSummary:
    """Which committed bronze batches are not in this tokenizer's silver table yet."""
    lake, plan = _plan(lakehouse, source, model)
    return SilverPlanSummary(
        pending=[b.batch_id for b in plan.pending],
        pending_rows=sum(b.rows for b in plan.pending),
        bronze_batches=plan.bronze_batches,
        bronze_version=plan.bronze_version,
        uri=lake.uri(plan.table),
        bronze_uri=lake.uri(bronze_dir(source.dataset_key, source.language_key)),
        tokenizer_key=plan.tokenizer.key,
    )


# The lakehouse state is the cache: re-running finds committed batches and skips them, so a
# Prefect result cache would only hide new bronze batches.
@task(name="build-silver", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def run_silver_job(
    *,
    lakehouse: LakehouseParams,
    source: SourceParams,
    model: ModelParams,
    transform: TransformParams,
    parameters: dict[str, str],
) -> list[BatchOutcome]:
    """Clean, dedupe and tokenize every pending bronze batch with Spark; commit each."""
    from tasks.silver.spark import spark_session

    logger = get_run_logger()
    # Planned again: a concurrent run may have committed batches since plan-silver.
    lake, plan = _plan(lakehouse, source, model)
    if not plan.pending:  # a concurrent run got there first
        return []
    logger.info(
        "building silver from bronze version %s, batches %s",
        plan.bronze_version,
        ", ".join(b.batch_id for b in plan.pending),
    )
    spark = spark_session(
        transform.spark_master, transform.spark_remote, transform.spark_driver_memory
    )
    job = SilverJob.from_params(source, transform)
    outcomes = build_silver(lake, plan, spark, job, parameters)
    for o in outcomes:
        logger.info(
            "%s bronze %s: %d rows in, %d to silver, rejected %s -> %s (version %s)",
            "committed" if o.committed else "already committed",
            o.bronze_batch_id,
            o.bronze_rows,
            o.rows,
            o.rejected or "none",
            lake.uri(plan.table),
            o.version,
        )
    return outcomes


@task(name="publish-silver", cache_policy=NO_CACHE)
def publish_silver(
    *,
    plan: SilverPlanSummary,
    model: ModelParams,
    source: SourceParams,
    outcomes: list[BatchOutcome],
) -> None:
    """Emit lakehouse.silver.committed and a table artifact of rows and rejects per batch."""
    committed = [o for o in outcomes if o.committed]
    if not committed:
        return
    ds, lang = source.dataset_key, source.language_key
    emit_event(
        event="lakehouse.silver.committed",
        resource={
            "prefect.resource.id": f"lakehouse.silver.{ds}.{lang}",
            "prefect.resource.name": f"silver {ds}/{lang}/{plan.tokenizer_key}",
        },
        payload={
            "batch_ids": [o.batch_id for o in committed],
            "uris": [plan.uri],
            "versions": [o.version for o in committed],
            "parent_batch_ids": [o.bronze_batch_id for o in committed],
            "rows": sum(o.rows for o in committed),
            "tokenizer": plan.tokenizer_key,
            "tokenizer_name": model.name_or_path,
            "table": plan.uri,
        },
    )
    reasons = sorted(
        {r for o in committed for r in o.rejected},
        key=lambda r: REASONS.index(r) if r in REASONS else 99,
    )
    create_table_artifact(
        key=artifact_key("silver", ds, lang),
        table=[
            {
                "batch": o.batch_id,
                "bronze_batch": o.bronze_batch_id,
                "rows_in": o.bronze_rows,
                "rows_out": o.rows,
                "rejected": sum(o.rejected.values()),
                **{r: o.rejected.get(r, 0) for r in reasons},
            }
            for o in committed
        ],
        description=f"Silver batches committed to {plan.uri} (rows in, out, rejects by reason)",
    )
