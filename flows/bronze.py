"""Bronze subflow: ingest a Hugging Face dataset or files into the lakehouse, exactly once."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import PipelineParams, flatten
from flows.results import BronzeResult
from tasks.bronze.schedule import usable_cpus, wave_shares
from tasks.bronze.tasks import IngestProgress, ingest_unit, publish_bronze, resolve_source
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse


@flow(name="bronze", log_prints=True)
def bronze_flow(params: PipelineParams = PipelineParams()) -> BronzeResult:
    """Ingest every new file or shard of `source` into bronze, `source.concurrency` at once;
    skip what was ingested before; go on with units a row budget left partial."""
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
    concurrency = src.concurrency or usable_cpus()
    # Partial units first (finish what was started), then new ones, each in uri order; the
    # row budget is shared out wave by wave in that order, so a run is deterministic.
    todo = [u for u in plan.todo if u.uri in plan.progress]
    todo += [u for u in plan.todo if u.uri not in plan.progress]
    outcomes, remaining = [], src.max_rows
    progress = IngestProgress(source=src, units=len(todo))
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        while todo and (remaining is None or remaining > 0):
            shares = wave_shares(remaining, len(todo), concurrency)
            wave, todo = todo[: len(shares)], todo[len(shares) :]
            futures = [
                runner.submit(
                    ingest_unit,
                    parameters={
                        "lakehouse": lh,
                        "source": src,
                        "unit": unit,
                        "max_rows": share,
                        "parameters": parameters,
                        "progress": plan.progress.get(unit.uri),
                    },
                )
                for unit, share in zip(wave, shares, strict=True)
            ]
            done = []
            for future in futures:
                done.append(future.result())
                progress.unit_done(done[-1])
            outcomes += done
            if remaining is not None:
                remaining -= sum(o.rows for o in done if o.committed)
    pending = [u.uri for u in todo]
    progress.finish(len(pending))
    partial = [o.uri for o in outcomes if o.partial]
    publish_bronze(lakehouse=lh, source=src, outcomes=outcomes, pending=pending)
    committed = [o for o in outcomes if o.committed and o.rows]
    rows = sum(o.rows for o in committed)
    msg = f"committed {len(committed)} batch(es), {rows} rows to {table_uri}"
    if partial or pending:
        msg += (
            f"; row budget reached: {len(partial)} unit(s) partial, {len(pending)} not "
            "started (the next run goes on)"
        )
    logger.info(msg)
    return BronzeResult(
        batch_ids=[o.batch_id for o in committed],
        rows=rows,
        skipped_sources=plan.skipped,
        changed_sources=plan.changed,
        partial_sources=partial,
        pending_sources=pending,
        uri=table_uri,
        message=msg,
    )
