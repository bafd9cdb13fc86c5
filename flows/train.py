"""Training subflow: fine-tune on committed silver, checkpoint to the lakehouse, track in MLflow."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams, flatten
from flows.results import TrainResult
from tasks.train.tasks import (
    finish_tracking,
    plan_train,
    publish_train,
    start_tracking,
    train_model,
)


@flow(name="train", log_prints=True)
def train_flow(params: PipelineParams = PipelineParams()) -> TrainResult:
    """Train (or resume) `model` with `train.objective` on the silver table of its tokenizer."""
    logger = get_run_logger()
    lh, src, model, train, trk = (
        params.lakehouse,
        params.source,
        params.model,
        params.train,
        params.tracking,
    )
    plan = plan_train(
        lh.root, lh.block, src.dataset_key, src.language_key, model.model_dump(), train.model_dump()
    )
    run_params = {
        k: v
        for k, v in flatten(params).items()
        if k.startswith(("model.", "train.", "source.", "lakehouse.root"))
    }
    run_id = start_tracking(
        trk.uri,
        trk.experiment,
        plan["run_name"],
        run_params,
        {
            "run_name": plan["run_name"],
            "silver_table": plan["table_uri"],
            "objective": train.objective,
            "tokenizer": plan["tokenizer_key"],
        },
        trk.token_secret,
    )
    result = train_model(plan, model.model_dump(), train.model_dump(), run_id, trk.uri)
    publish_train(plan["run_name"], result, plan)

    # Also after "already trained": a run killed while logging or registering completes here.
    name, version = finish_tracking(
        run_id,
        trk.uri,
        result,
        plan,
        run_params,
        trk.registered_model,
        trk.champion_metric,
        trk.champion_greater_is_better,
        trk.token_secret,
    )
    logger.info(
        "checkpoints: %s | final model: %s | loss curve: %s",
        result["output_uri"],
        result["final_model_uri"],
        result["loss_curve_uri"],
    )
    return TrainResult(
        global_step=result["global_step"],
        train_loss=result["train_loss"],
        eval_loss=result["eval_loss"],
        tokens_seen=result["tokens_seen"],
        tokens_per_second=result["tokens_per_second"],
        nonpad_fraction=result["nonpad_fraction"],
        checkpoint_uri=result["checkpoint_uri"],
        resumed_from_step=result["resumed_from_step"],
        mlflow_run_id=run_id,
        model_name=name,
        model_version=version,
        metrics={
            **result["metrics"],
            "output_uri": result["output_uri"],
            "final_model_uri": result["final_model_uri"],
            "loss_curve_uri": result["loss_curve_uri"],
            "run_name": result["run_name"],
        },
        message=result["message"],
    )
