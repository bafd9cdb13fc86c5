"""TODO docstring."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.lakehouse.manifest import Manifest
from tasks.lakehouse.storage import open_lakehouse
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
from tasks.train.data import (
    PAIR_COLUMNS,
    TRAIN_COLUMNS,
    TrainingError,
    read_silver,
)
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
from tasks.train.plan import work_dir
from tasks.train.trainer import (
    sacrebleu_metrics,
    trainer_callbacks,
    trainer_class,
    training_arguments,
)

log = logging.getLogger(__name__)


def local_final_model(plan: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
    """The finished run's final model as a local folder (downloaded from the lakehouse when
    this machine does not have it, e.g. a re-run elsewhere after a crash during tracking)."""
    folder = Path(result["final_model_dir"])
    if (folder / COMPLETE).is_file():
        return folder
    store = CheckpointStore(
        Path(plan["local_dir"]), open_lakehouse(plan["root"], plan["block"]), plan.get("remote_rel")
    )
    if store.lake is None:
        raise TrainingError(
            f"{folder}: the final model is missing; re-train with train.resume=never"
        )
    folder = store.local_dir / FINAL
    store._download(f"{store.remote_rel}/{FINAL}", folder)
    return folder


def train_model(
    plan: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train: Mapping[str, Any],
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train (or resume) the planned run; returns the metrics and where things are."""
    from transformers import set_seed

    objective = train["objective"]
    lake = open_lakehouse(plan["root"], plan["block"])
    store = CheckpointStore(Path(plan["local_dir"]), lake, plan.get("remote_rel"))
    store.local_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0

    if train.get("resume", "auto") == "auto":
        done = store.finished_result()
        if done is not None:
            done["message"] = f"already trained: {store.uri}/{FINAL} (train.resume=never retrains)"
            done["already_trained"] = True
            return done
        resume_from = store.latest()
    else:
        resume_from = None
    resume_step = checkpoint_step(resume_from.name) if resume_from else None
    if is_main:
        store.clean_after(resume_step)

    set_seed(int(train["seed"]))
    name = model_params["name_or_path"]
    tokenizer = load_tokenizer(name, model_params.get("revision"))
    model = load_model(name, model_params.get("revision"))
    device = resolve_device(
        train.get("device", "auto"), train.get("precision", "auto"), model_width(model.config)
    )
    log.info(
        "training %s on %s (%d GPU), %s",
        plan["run_name"],
        device["name"],
        device["gpus"],
        "bf16 mixed precision" if device["bf16"] else "fp32",
    )
    lengths = plan["lengths"]

    manifests = [Manifest.model_validate(m) for m in plan["manifests"]]
    columns = TRAIN_COLUMNS + (PAIR_COLUMNS if objective == "supervised" else [])
    cache = work_dir() / "datasets"
    silver = read_silver(lake, manifests, columns, cache)
    docs_head = [list(x) for x in silver.select(range(min(len(silver), 200)))["input_ids"]]
    lang_id = language_code_id(tokenizer, docs_head) if objective != "span_corruption" else None
    drop = [lang_id] if lang_id is not None else []
    train_ds, eval_ds = build_datasets(
        silver,
        objective,
        tokenizer,
        lengths,
        train["eval_fraction"],
        train["max_eval_samples"],
        drop,
    )
    train_collator, eval_collator = build_collators(objective, tokenizer, lengths, train, lang_id)
    if objective == "supervised" and lang_id is not None:
        # mBART pairs: the decoder starts from the target language code (labels end with it).
        labels_head = [list(x) for x in train_ds.select(range(min(len(train_ds), 50)))["labels"]]
        tgt_lang = language_code_id(tokenizer, labels_head)
        if tgt_lang is not None:
            model.generation_config.decoder_start_token_id = tgt_lang

    prior = TokenMeter()
    if resume_from is not None and (resume_from / METER_FILE).is_file():
        prior = TokenMeter.from_dict(json.loads((resume_from / METER_FILE).read_text()))
    args = training_arguments(store.local_dir, train, device, len(eval_ds) > 0, objective)
    noise_cb, complete_cb = trainer_callbacks(train_collator, store, resume_step or 0)
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=train_collator,
        processing_class=tokenizer,
        eval_collator=eval_collator,
        pad_id=tokenizer.pad_token_id,
        prior_meter=prior,
        compute_metrics=sacrebleu_metrics(tokenizer) if objective == "supervised" else None,
        callbacks=[noise_cb, complete_cb, *(callbacks or [])],
    )
    complete_cb.trainer = trainer
    if resume_from is not None:
        log.info("resuming %s from %s (step %d)", plan["run_name"], resume_from, resume_step)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = trainer.train_seconds()
    run_meter, total = trainer.run_meter(), trainer.total_meter()

    history = trainer.state.log_history
    if len(eval_ds) and not any(
        h.get("step") == trainer.state.global_step and "eval_loss" in h for h in history
    ):
        trainer.evaluate()
        history = trainer.state.log_history
    if not is_main:
        return {}

    final_dir = store.local_dir / FINAL
    shutil.rmtree(final_dir, ignore_errors=True)
    trainer.save_model(str(final_dir))
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens_per_second = run_meter.tokens / seconds if seconds else None
    metrics: dict[str, Any] = {
        "train_loss": train_losses[-1] if train_losses else output.training_loss,
        "train_loss_avg": output.training_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": total.tokens,
        "input_tokens_seen": total.input_tokens,
        "label_tokens_seen": total.label_tokens,
        "tokens_per_second": tokens_per_second,
        "slots_per_second": run_meter.slots / seconds if seconds else None,
        "nonpad_fraction": total.nonpad_fraction,
        "train_seconds": seconds,
        "eval_seconds": trainer.eval_seconds,
        "steps_this_run": trainer.state.global_step - (resume_step or 0),
        "device": device["name"],
        "bf16": device["bf16"],
        "packed_train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
    }
    for key in ("eval_bleu", "eval_chrf"):
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[key.removeprefix("eval_")] = vals[-1]
    enc, dec = encoder_decoder_params(trainer.model)
    metrics["params"] = sum(p.numel() for p in trainer.model.parameters())
    if device["device"] == "cuda" and seconds:
        flops = train_flops(enc, dec, run_meter.input_tokens, run_meter.label_tokens)
        metrics["mfu"] = mfu(
            flops,
            seconds,
            peak_flops(device["name"], device["bf16"]),
            max(1, int(os.environ.get("WORLD_SIZE", "1"))),
        )
    else:
        metrics["mfu"] = None  # MFU needs a GPU peak to compare with

    curve = plot_loss_curve(
        history, store.local_dir / LOSS_CURVE, title=f"{plan['run_name']} ({objective})"
    )
    (store.local_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    last_ckpt = store.latest()
    result = {
        "global_step": trainer.state.global_step,
        "train_loss": metrics["train_loss"],
        "eval_loss": metrics["eval_loss"],
        "tokens_seen": total.tokens,
        "tokens_per_second": tokens_per_second,
        "nonpad_fraction": total.nonpad_fraction,
        "checkpoint_uri": (f"{store.uri}/{last_ckpt.name}" if last_ckpt else store.uri),
        "resumed_from_step": resume_step,
        "metrics": metrics,
        "run_name": plan["run_name"],
        "output_uri": store.uri,
        "final_model_uri": f"{store.uri}/{FINAL}",
        "final_model_dir": str(final_dir),
        "loss_curve_uri": f"{store.uri}/{LOSS_CURVE}",
        "loss_curve_path": str(curve),
        "log_history_path": str(store.local_dir / "log_history.json"),
        "message": (
            f"trained {plan['run_name']} to step {trainer.state.global_step}"
            + (f" (resumed from step {resume_step})" if resume_step else "")
        ),
    }
    # Final model first, its marker last; the stored result makes a re-run a no-op.
    (final_dir / COMPLETE).write_text(json.dumps({"files": file_sizes(final_dir)}))
    store.publish(final_dir, FINAL)
    store.publish(curve, LOSS_CURVE)
    store.publish(store.local_dir / "log_history.json", "log_history.json")
    (store.local_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    store.publish(store.local_dir / RESULT_FILE, RESULT_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train.run SPEC.json RESULT.json` (one process per GPU under torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tasks.train.run SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    callbacks = []
    if spec.get("mlflow_run_id"):
        try:
            from tasks.tracking import runs as tracking

            callbacks.append(
                tracking.MlflowMetricsCallback(spec["mlflow_run_id"], spec["tracking_uri"])
            )
        except (ImportError, AttributeError):
            pass
    try:
        result = train_model(spec["plan"], spec["model"], spec["train"], callbacks)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        Path(argv[1]).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
