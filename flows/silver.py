"""Silver subflow: clean, dedupe and tokenize new bronze batches with Spark, exactly once."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams, flatten
from flows.results import SilverResult
from tasks.silver.tasks import find_pending_bronze, publish_silver, run_silver_job

# What decides silver's content (recorded with each commit); not where Spark ran.
CONTENT_KEYS = (
    "transform.",
    "model.name_or_path",
    "model.revision",
    "source.text_column",
    "source.target_column",
)


@flow(name="silver", log_prints=True)
def silver_flow(params: PipelineParams = PipelineParams()) -> SilverResult:
    """Turn every committed bronze batch not yet in silver into a silver batch."""
    logger = get_run_logger()
    lh, src, tf, model = params.lakehouse, params.source, params.transform, params.model

    plan = find_pending_bronze(lakehouse=lh, source=src, model=model)
    if not plan.pending:
        if plan.bronze_batches == 0:
            msg = f"nothing to do: no committed bronze in {plan.bronze_uri} (run bronze first)"
        else:
            msg = (
                f"nothing to do: all {plan.bronze_batches} bronze batch(es) are already "
                f"in {plan.uri}"
            )
        logger.info(msg)
        return SilverResult(uri=plan.uri, tokenizer=plan.tokenizer_key, message=msg)

    logger.info(
        "%d bronze batch(es), %d rows to process into %s",
        len(plan.pending),
        plan.pending_rows,
        plan.uri,
    )
    parameters = {
        k: str(v)
        for k, v in flatten(params).items()
        if k.startswith(CONTENT_KEYS)
        and not k.startswith(("transform.spark_", "transform.executor_sas"))
    }
    outcomes = run_silver_job(
        lakehouse=lh, source=src, model=model, transform=tf, parameters=parameters
    )
    publish_silver(plan=plan, model=model, source=src, outcomes=outcomes)

    committed = [o for o in outcomes if o.committed]
    rejected: dict[str, int] = {}
    for o in committed:
        for reason, n in o.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
    rows = sum(o.rows for o in committed)
    msg = (
        f"committed {len(committed)} silver batch(es): {rows} rows, "
        f"{sum(rejected.values())} rejected, to {plan.uri}"
    )
    logger.info(msg)
    return SilverResult(
        batch_ids=[o.batch_id for o in committed],
        rows=rows,
        rejected=dict(sorted(rejected.items())),
        uri=plan.uri,
        tokenizer=plan.tokenizer_key,
        parent_batch_ids=[o.bronze_batch_id for o in committed],
        message=msg,
    )
