"""One training run, from committed silver to a final model: what a rank executes.

`fit_model` is the whole run in one screen: resume point, model, datasets, collators, Trainer,
then (rank 0 only) the final model, curve and outcome, each published marker-last. The same
function runs inline in the flow's process and, for data-parallel training, in every process
that torchrun starts with `python -m tasks.train.run SPEC.json RESULT.json` (`main` below); it
imports no Prefect, so a rank needs nothing but the spec file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from tasks.lakehouse.storage import open_lakehouse
from tasks.params import ModelParams, TrainParams
from tasks.train import ranks
from tasks.train.checkpoints import (
    COMPLETE,
    FINAL,
    LOSS_CURVE,
    METER_FILE,
    RESULT_FILE,
    CheckpointStore,
    checkpoint_step,
    file_sizes,
)
from tasks.train.data import PAIR_COLUMNS, TRAIN_COLUMNS, TrainingError, read_silver
from tasks.train.launch import LaunchSpec
from tasks.train.metrics import (
    TokenMeter,
    encoder_decoder_params,
    mfu,
    peak_flops,
    plot_loss_curve,
    train_flops,
)
from tasks.train.model import load_model, load_tokenizer, model_width, resolve_device
from tasks.train.objectives import build_collators, build_datasets, language_code_id
from tasks.train.outcome import TrainOutcome
from tasks.train.plan import TrainPlan, work_dir
from tasks.train.trainer import (
    CompleteCheckpointCallback,
    EpochNoiseCallback,
    LakehouseTrainer,
    SacreBleu,
    StepProgressCallback,
    training_arguments,
)

log = logging.getLogger(__name__)

HISTORY_FILE = "log_history.json"


def checkpoint_store(plan: TrainPlan) -> CheckpointStore:
    """The run's checkpoints: its local folder, mirrored to the lakehouse when that is remote."""
    lake = open_lakehouse(plan.root, plan.block)
    return CheckpointStore(Path(plan.local_dir), lake, plan.remote_rel)


def local_final_model(plan: TrainPlan, outcome: TrainOutcome) -> Path:
    """The finished run's final model as a local folder (downloaded from the lakehouse when
    this machine does not have it, e.g. a re-run elsewhere after a crash during tracking)."""
    folder = Path(outcome.final_model_dir)
    if (folder / COMPLETE).is_file():
        return folder
    found = checkpoint_store(plan).final_model()
    if found is None:
        raise TrainingError(
            f"{folder}: the final model is missing; re-train with train.resume=never"
        )
    return found


def finished_outcome(plan: TrainPlan, train: TrainParams) -> TrainOutcome | None:
    """With train.resume=auto, the stored outcome of a run that already finished, else None."""
    if train.resume != "auto":
        return None
    store = checkpoint_store(plan)
    done = store.finished_result()
    if done is None:
        return None
    message = f"already trained: {store.uri}/{FINAL} (train.resume=never retrains)"
    return dataclasses.replace(done, message=message, already_trained=True)


def fit_model(
    *,
    plan: TrainPlan,
    model: ModelParams,
    train: TrainParams,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainOutcome | None:
    """Train (or resume) the planned run; rank 0 returns the outcome, other ranks None."""
    store = checkpoint_store(plan)
    store.local_dir.mkdir(parents=True, exist_ok=True)
    rank, world = ranks.rank(), ranks.world_size()
    objective = train.objective

    with ranks.main_first():  # rank 0 downloads and cleans; the others then find it done
        if (done := finished_outcome(plan, train)) is not None:
            return done
        resume_from = store.latest() if train.resume == "auto" else None
        resume_step = checkpoint_step(resume_from.name) if resume_from else None
        if ranks.is_main():
            store.clean_after(resume_step)

    set_seed(train.seed)
    tokenizer = load_tokenizer(model.name_or_path, model.revision)
    seq2seq = load_model(model.name_or_path, model.revision)
    device = resolve_device(train.device, train.precision, model_width(seq2seq.config))
    log.info(
        "training %s on %s (%d GPU, process %d of %d), %s",
        plan.run_name,
        device["name"],
        device["gpus"],
        rank,
        world,
        "bf16 mixed precision" if device["bf16"] else "fp32",
    )

    columns = TRAIN_COLUMNS + (PAIR_COLUMNS if objective == "supervised" else [])
    with ranks.main_first():  # one rank fills the datasets cache, the others read it
        lake = open_lakehouse(plan.root, plan.block)
        silver = read_silver(lake, plan.silver, columns, work_dir() / "datasets")
        head = [list(x) for x in silver.select(range(min(len(silver), 200)))["input_ids"]]
        lang_id = language_code_id(tokenizer, head) if objective != "span_corruption" else None
        train_ds, eval_ds = build_datasets(
            silver,
            objective=objective,
            tokenizer=tokenizer,
            lengths=plan.lengths,
            eval_fraction=train.eval_fraction,
            max_eval_samples=train.max_eval_samples,
            drop_ids=[lang_id] if lang_id is not None else [],
        )
    train_collator, eval_collator = build_collators(
        tokenizer=tokenizer,
        lengths=plan.lengths,
        train=train,
        lang_id=lang_id,
        rank=rank,
        world_size=world,
    )
    if objective == "supervised" and lang_id is not None:
        # mBART pairs: the decoder starts from the target language code (labels end with it).
        labels_head = [list(x) for x in train_ds.select(range(min(len(train_ds), 50)))["labels"]]
        tgt_lang = language_code_id(tokenizer, labels_head)
        if tgt_lang is not None:
            seq2seq.generation_config.decoder_start_token_id = tgt_lang

    prior = TokenMeter()
    if resume_from is not None and (resume_from / METER_FILE).is_file():
        prior = TokenMeter.from_dict(json.loads((resume_from / METER_FILE).read_text()))
    args = training_arguments(
        local_dir=store.local_dir,
        train=train,
        device=device,
        has_eval=len(eval_ds) > 0,
        processes=world,
    )
    trainer = LakehouseTrainer(
        model=seq2seq,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=train_collator,
        processing_class=tokenizer,
        eval_collator=eval_collator,
        pad_id=tokenizer.pad_token_id,
        prior_meter=prior,
        compute_metrics=SacreBleu(tokenizer) if objective == "supervised" else None,
        callbacks=[EpochNoiseCallback(train_collator, resume_step or 0), *callbacks],
    )
    trainer.add_callback(CompleteCheckpointCallback(trainer, store))
    if resume_from is not None:
        log.info("resuming %s from %s (step %d)", plan.run_name, resume_from, resume_step)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = trainer.train_seconds()
    run_meter, total = trainer.run_meter(), trainer.total_meter()
    history = trainer.state.log_history
    if len(eval_ds) and not any(
        h.get("step") == trainer.state.global_step and "eval_loss" in h for h in history
    ):
        trainer.evaluate()
        history = trainer.state.log_history
    if not ranks.is_main():
        return None
    metrics = run_metrics(trainer, output.training_loss, seconds, run_meter, total, device)
    metrics.update(
        steps_this_run=trainer.state.global_step - (resume_step or 0),
        processes=world,
        packed_train_examples=len(train_ds),
        eval_examples=len(eval_ds),
    )
    return publish_outcome(trainer, plan, store, metrics, resume_step, objective)


def run_metrics(
    trainer: LakehouseTrainer,
    average_loss: float,
    seconds: float,
    run_meter: TokenMeter,
    total: TokenMeter,
    device: dict[str, Any],
) -> dict[str, Any]:
    """Losses, token counts (all ranks) and throughput of the finished run."""
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics: dict[str, Any] = {
        "train_loss": train_losses[-1] if train_losses else average_loss,
        "train_loss_avg": average_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": total.tokens,
        "input_tokens_seen": total.input_tokens,
        "label_tokens_seen": total.label_tokens,
        "tokens_per_second": run_meter.tokens / seconds if seconds else None,
        "slots_per_second": run_meter.slots / seconds if seconds else None,
        "nonpad_fraction": total.nonpad_fraction,
        "train_seconds": seconds,
        "eval_seconds": trainer.eval_seconds,
        "device": device["name"],
        "bf16": device["bf16"],
    }
    for key in ("eval_bleu", "eval_chrf"):
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[key.removeprefix("eval_")] = vals[-1]
    enc, dec = encoder_decoder_params(trainer.model)
    metrics["params"] = sum(p.numel() for p in trainer.model.parameters())
    metrics["mfu"] = None  # MFU needs a GPU peak to compare with
    if device["device"] == "cuda" and seconds:
        flops = train_flops(enc, dec, run_meter.input_tokens, run_meter.label_tokens)
        peak = peak_flops(device["name"], device["bf16"])
        metrics["mfu"] = mfu(flops, seconds, peak, ranks.world_size())
    return metrics


def publish_outcome(
    trainer: LakehouseTrainer,
    plan: TrainPlan,
    store: CheckpointStore,
    metrics: dict[str, Any],
    resume_step: int | None,
    objective: str,
) -> TrainOutcome:
    """Save the final model, curve, history and outcome; the stored outcome goes last."""
    history = trainer.state.log_history
    final_dir = store.local_dir / FINAL
    shutil.rmtree(final_dir, ignore_errors=True)
    trainer.save_model(str(final_dir))
    curve = plot_loss_curve(
        history, store.local_dir / LOSS_CURVE, title=f"{plan.run_name} ({objective})"
    )
    (store.local_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    last_ckpt = store.latest()
    step = trainer.state.global_step
    outcome = TrainOutcome(
        run_name=plan.run_name,
        global_step=step,
        train_loss=metrics["train_loss"],
        eval_loss=metrics["eval_loss"],
        tokens_seen=metrics["tokens_seen"],
        tokens_per_second=metrics["tokens_per_second"],
        nonpad_fraction=metrics["nonpad_fraction"],
        checkpoint_uri=f"{store.uri}/{last_ckpt.name}" if last_ckpt else store.uri,
        resumed_from_step=resume_step,
        output_uri=store.uri,
        final_model_uri=f"{store.uri}/{FINAL}",
        final_model_dir=str(final_dir),
        loss_curve_uri=f"{store.uri}/{LOSS_CURVE}",
        loss_curve_path=str(curve),
        log_history_path=str(store.local_dir / HISTORY_FILE),
        message=f"trained {plan.run_name} to step {step}"
        + (f" (resumed from step {resume_step})" if resume_step else ""),
        metrics=metrics,
    )
    # Final model first, its marker last; the stored outcome makes a re-run a no-op.
    (final_dir / COMPLETE).write_text(json.dumps({"files": file_sizes(final_dir)}))
    store.publish(final_dir, FINAL)
    store.publish(curve, LOSS_CURVE)
    store.publish(store.local_dir / HISTORY_FILE, HISTORY_FILE)
    (store.local_dir / RESULT_FILE).write_text(outcome.to_json())
    store.publish(store.local_dir / RESULT_FILE, RESULT_FILE)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train.run SPEC.json RESULT.json`: one rank, as torchrun starts it."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tasks.train.run SPEC.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ranks.watch_launcher()
    spec = LaunchSpec.read(Path(argv[0]))
    callbacks: list[TrainerCallback] = []
    if ranks.is_main():  # rank 0 alone reports progress and logs per-step metrics
        callbacks.append(StepProgressCallback(_log_progress, spec.train.max_steps))
        if spec.mlflow_run_id:
            from tasks.tracking.callback import MlflowMetricsCallback

            callbacks.append(MlflowMetricsCallback(spec.mlflow_run_id, spec.tracking_uri))
    try:
        ranks.init_process_group(cuda=_uses_cuda(spec.train))
        outcome = fit_model(plan=spec.plan, model=spec.model, train=spec.train, callbacks=callbacks)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        ranks.destroy_process_group()
    if outcome is not None and ranks.is_main():
        Path(argv[1]).write_text(outcome.to_json())
    return 0


def _log_progress(step: int, max_steps: int) -> None:
    # The launcher reads these lines back (tasks.train.launch.PROGRESS_RE).
    log.info("training progress: step %d/%d", step, max_steps)


def _uses_cuda(train: TrainParams) -> bool:
    import torch

    return train.device != "cpu" and torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
