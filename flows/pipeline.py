"""Parent flow: bronze -> silver -> train, one subflow per layer, and a summary artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.bronze import bronze_flow
from flows.params import PipelineParams, parse_override
from flows.results import PipelineResult, TrainResult
from flows.silver import silver_flow
from flows.train import train_flow
from tasks.landing.zone import normalize_uri
from tasks.pipeline.tasks import choose_infra, publish_summary, run_training_deployment
from tasks.train.launch import gpu_job_variables


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    params: PipelineParams = PipelineParams(),
    data_files: list[str] | None = None,
    overrides: list[str] | None = None,
) -> PipelineResult:
    """Ingest new data into bronze, clean and tokenize it into silver, then fine-tune on it.

    Args:
        params: all pipeline parameters.
        data_files: ingest exactly these files (replaces `source.data_files`); the landing
            trigger fills it from the `lakehouse.landing.arrived` event.
        overrides: dotted `key=value` overrides applied to `params` (`train.max_steps=100`).
    """
    logger = get_run_logger()
    params = with_run_inputs(params, data_files, overrides)

    bronze = bronze_flow(params=params)
    silver = silver_flow(params=params)

    train: TrainResult | None = None
    infra: str | None = None
    skipped: str | None = None
    unfinished = bronze.partial_sources + bronze.pending_sources
    if silver.batch_ids and unfinished and not params.train.on_partial:
        # A row budget spanning runs: one model version when bronze has caught up, not one
        # per chunk. The `train` flow trains on what silver holds whenever asked.
        skipped = (
            f"bronze left {len(unfinished)} unit(s) unfinished under the row budget "
            "(source.max_rows); the pipeline trains once a run leaves none partial (or with "
            "train.on_partial=true). Run the `train` flow to train on the silver table now"
        )
        logger.info("training skipped: %s", skipped)
    elif silver.batch_ids:
        infra, why = choose_infra(params.train.infra, params.train.device)
        logger.info("training on %s (%s)", infra, why)
        train = run_training(params, infra)
    else:
        skipped = (
            "no new silver batch, so nothing new to learn from; run the `train` flow to "
            "train on the existing silver table"
        )
        logger.info("training skipped: %s", skipped)

    publish_summary(
        dataset_key=params.source.dataset_key,
        language=params.source.language_key,
        bronze=bronze.model_dump(mode="json"),
        silver=silver.model_dump(mode="json"),
        train=train.model_dump(mode="json") if train else None,
        skipped_train=skipped,
        infra=infra,
        tracking_uri=params.tracking.uri,
    )
    return PipelineResult(
        bronze=bronze if bronze.batch_ids else None,
        silver=silver if silver.batch_ids else None,
        train=train,
    )


def run_training(params: PipelineParams, infra: str) -> TrainResult:
    """The training subflow, in process or as a deployment run on a work pool."""
    if infra == "inline":
        return train_flow(params=params)
    result = run_training_deployment(
        infra,
        params.model_dump(mode="json"),
        idempotency_key=f"{flow_run.get_id()}:train",
        # One GPU per training process on the docker-gpu pool.
        job_variables=gpu_job_variables(params.train) if infra == "docker-gpu" else None,
    )
    return result if isinstance(result, TrainResult) else TrainResult.model_validate(result)


def with_run_inputs(
    params: PipelineParams, data_files: list[str] | None, overrides: list[str] | None
) -> PipelineParams:
    """`params` with the run's dotted overrides and explicit data files applied (validated)."""
    if not data_files and not overrides:
        return params
    tree: dict[str, Any] = params.model_dump(mode="json")
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] not in PipelineParams.model_fields or len(path) < 2:
            raise ValueError(
                f"overrides: {item!r} is not <section>.<field>=<value>; sections "
                f"are {', '.join(PipelineParams.model_fields)}"
            )
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if data_files:
        tree["source"]["data_files"] = [normalize_uri(f) for f in data_files]
    return PipelineParams.model_validate(tree)
