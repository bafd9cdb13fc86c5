"""Bronze subflow: ingest a Hugging Face dataset or files into the lakehouse, exactly once."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams, flatten
from flows.results import BronzeResult
from tasks.bronze.tasks import ingest_unit, publish_bronze, resolve_source
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse


@flow(name="bronze", log_prints=True)
def bronze_flow(params: PipelineParams = PipelineParams()) -> BronzeResult:
    """Ingest every new file or shard of `source` into bronze; skip what was ingested before."""
    logger = get_run_logger()
    lh, src = params.lakehouse, params.source
    table_uri = open_lakehouse(lh.root, lh.block).uri(bronze_dir(src.dataset_key, src.language_key))

    plan = resolve_source(lakehouse=lh, source=src)
    if plan.changed:
        logger.warning("changed after ingestion, quarantined (not re-ingested): %s", plan.changed)
    if not plan.todo:
        msg = f"nothing new: {len(plan.skipped)} source(s) already in {table_uri}"
        logger.info(msg)
        return BronzeResult(
            skipped_sources=plan.skipped, changed_sources=plan.changed, uri=table_uri, message=msg
        )

    parameters = {k: str(v) for k, v in flatten(params).items() if k.startswith("source.")}
    outcomes, remaining = [], src.max_rows
    for unit in plan.todo:  # in order, so max_rows caps the run deterministically
        if remaining is not None and remaining <= 0:
            break
        outcome = ingest_unit(
            lakehouse=lh, source=src, unit=unit, max_rows=remaining, parameters=parameters
        )
        outcomes.append(outcome)
        if remaining is not None:
            remaining -= outcome.rows
    publish_bronze(lakehouse=lh, source=src, outcomes=outcomes)
    committed = [o for o in outcomes if o.committed]
    rows = sum(o.rows for o in committed)
    msg = f"committed {len(committed)} batch(es), {rows} rows to {table_uri}"
    logger.info(msg)
    return BronzeResult(
        batch_ids=[o.batch_id for o in committed],
        rows=rows,
        skipped_sources=plan.skipped,
        changed_sources=plan.changed,
        uri=table_uri,
        message=msg,
    )
