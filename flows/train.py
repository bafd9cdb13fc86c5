"""Training subflow: fine-tune on committed silver, checkpoint to the lakehouse, track in MLflow."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams, flatten
from flows.results import TrainResult
from tasks.tracking.tasks import (
    evaluate_candidate,
    finish_tracking,
    register_candidate,
    start_tracking,
)
from tasks.train.tasks import plan_train, publish_train, train_model


@flow(name="train", log_prints=True)
def train_flow(params: PipelineParams = PipelineParams()) -> TrainResult:
    """Train (or resume) `model` with `train.objective` on the silver table of its tokenizer."""
    logger = get_run_logger()
    plan = plan_train(
        lakehouse=params.lakehouse, source=params.source, model=params.model, train=params.train
    )
    run_params = {
        k: v
        for k, v in flatten(params).items()
        if k.startswith(("model.", "train.", "source.", "lakehouse.root"))
    }
    trk = params.tracking
    run_id = start_tracking(
        tracking=trk,
        run_key=plan.run_name,
        params=run_params,
        tags={
            "run_name": plan.run_name,
            "silver_table": plan.table_uri,
            "objective": params.train.objective,
            "tokenizer": plan.tokenizer_key,
        },
    )
    # With train.processes > 1 this launches the ranks and returns after they all exited.
    outcome = train_model(
        plan=plan,
        model=params.model,
        train=params.train,
        mlflow_run_id=run_id,
        tracking_uri=trk.uri,
    )
    publish_train(plan=plan, outcome=outcome)

    # Also after "already trained": a run killed while logging or registering completes here.
    # Base model and fine-tuned model on the held-out rows, then the model, then the registry
    # (the champion is scored on these rows too before the alias moves).
    evaluation = evaluate_candidate(
        run_id=run_id,
        tracking=trk,
        plan=plan,
        outcome=outcome,
        model=params.model,
        train=params.train,
    )
    finish_tracking(
        run_id=run_id,
        tracking=trk,
        plan=plan,
        outcome=outcome,
        train=params.train,
        params=run_params,
        evaluation=evaluation,
    )
    registered = register_candidate(
        run_id=run_id,
        tracking=trk,
        plan=plan,
        outcome=outcome,
        model=params.model,
        train=params.train,
        evaluation=evaluation,
    )
    logger.info(
        "checkpoints: %s | final model: %s | loss curve: %s",
        outcome.output_uri,
        outcome.final_model_uri,
        outcome.loss_curve_uri,
    )
    return TrainResult(
        global_step=outcome.global_step,
        train_loss=outcome.train_loss,
        eval_loss=outcome.eval_loss,
        tokens_seen=outcome.tokens_seen,
        tokens_per_second=outcome.tokens_per_second,
        nonpad_fraction=outcome.nonpad_fraction,
        checkpoint_uri=outcome.checkpoint_uri,
        resumed_from_step=outcome.resumed_from_step,
        mlflow_run_id=run_id,
        model_name=registered.name,
        model_version=registered.version,
        promotion=registered.report,
        metrics={
            **outcome.metrics,
            "output_uri": outcome.output_uri,
            "final_model_uri": outcome.final_model_uri,
            "loss_curve_uri": outcome.loss_curve_uri,
            "run_name": outcome.run_name,
        },
        message=outcome.message,
    )
