"""Silver subflow: clean, dedupe and tokenize new bronze batches with Spark, exactly once."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams, flatten
from flows.results import SilverResult
from tasks.silver.tasks import build_silver, plan_silver, publish_silver


@flow(name="silver", log_prints=True)
def silver_flow(params: PipelineParams = PipelineParams()) -> SilverResult:
    """Turn every committed bronze batch not yet in silver into a silver batch."""
    logger = get_run_logger()
    lh, src, tf, model = params.lakehouse, params.source, params.transform, params.model
    ds, lang = src.dataset_key, src.language_key

    plan = plan_silver(
        lh.root,
        lh.block,
        ds,
        lang,
        model.name_or_path,
        model.revision,
        src.text_column,
        src.target_column,
    )
    if not plan["pending"]:
        if plan["bronze_batches"] == 0:
            msg = f"nothing to do: no committed bronze in {plan['bronze_uri']} (run bronze first)"
        else:
            msg = (
                f"nothing to do: all {plan['bronze_batches']} bronze batch(es) are already "
                f"in {plan['uri']}"
            )
        logger.info(msg)
        return SilverResult(uri=plan["uri"], tokenizer=plan["tokenizer_key"], message=msg)

    logger.info(
        "%d bronze batch(es), %d rows to process into %s",
        len(plan["pending"]),
        plan["pending_rows"],
        plan["uri"],
    )
    # What decides silver's content (recorded in each manifest); not where Spark ran.
    parameters = {
        k: v
        for k, v in flatten(params).items()
        if k.startswith(
            (
                "transform.",
                "model.name_or_path",
                "model.revision",
                "source.text_column",
                "source.target_column",
            )
        )
        and not k.startswith(("transform.spark_", "transform.direct_io"))
    }
    batches = build_silver(
        lh.root,
        lh.block,
        ds,
        lang,
        model.name_or_path,
        model.revision,
        src.text_column,
        src.target_column,
        tf.model_dump(mode="json"),
        parameters,
    )
    publish_silver(lh.root, lh.block, ds, lang, plan["tokenizer_key"], model.name_or_path, batches)

    committed = [b for b in batches if b["committed"]]
    rejected: dict[str, int] = {}
    for b in committed:
        for reason, n in b["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    rows = sum(b["rows"] for b in committed)
    msg = (
        f"committed {len(committed)} silver batch(es): {rows} rows, "
        f"{sum(rejected.values())} rejected, to {plan['uri']}"
    )
    logger.info(msg)
    return SilverResult(
        batch_ids=[b["batch_id"] for b in committed],
        rows=rows,
        rejected=dict(sorted(rejected.items())),
        uri=plan["uri"],
        tokenizer=plan["tokenizer_key"],
        parent_batch_ids=[b["bronze_batch_id"] for b in committed],
        message=msg,
    )
