"""Our Seq2SeqTrainer: counts useful tokens, keeps eval noise fixed, marks complete checkpoints.

Trainer does the loop, the optimizer, mixed precision, DDP and checkpoint files; what it does not
know about is added here and nowhere else: useful-token metrics (summed over ranks at every
logging step), the collators' epoch (Trainer does not tell collators), the supervised sampler
(`tasks.train.objectives.PairLengthSampler`), fixed noise for evaluation, and the completion
marker that makes a checkpoint safe to resume from (`tasks.train.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

from tasks.params import TrainParams
from tasks.train.checkpoints import METER_FILE, CheckpointStore
from tasks.train.data import TrainingError
from tasks.train.metrics import TokenMeter
from tasks.train.objectives import PairLengthSampler
from tasks.train.packing import LABEL_PAD_ID

log = logging.getLogger(__name__)


class LakehouseTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that counts useful tokens and evaluates with fixed-noise batches."""

    def __init__(
        self,
        *args,
        eval_collator=None,
        pad_id: int | None = None,
        prior_meter: TokenMeter | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.pad_id = pad_id
        self.meter = TokenMeter()
        self.prior_meter = prior_meter or TokenMeter()
        self.eval_seconds = 0.0
        self.loop_started: float | None = None
        # compute_loss below needs Trainer's count of the step's label tokens on all ranks (it
        # counts them only for models that take loss kwargs) and divides by it itself.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and "length" in ds.column_names:
            # The global batch of one optimizer step: the same rows whatever the process count.
            args = self.args
            global_batch = args.train_batch_size * args.gradient_accumulation_steps
            return PairLengthSampler(
                ds["length"],
                global_batch * max(1, args.world_size),
                args.seed if args.data_seed is None else args.data_seed,
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token-mean cross-entropy over the whole optimizer step, on every rank together.

        T5 and mBART average the loss over their own batch's label tokens and ignore
        `num_items_in_batch`, so with several ranks (or gradient accumulation) a step's gradient
        was a mean of per-batch means, and Trainer still scaled it as if it were not. Here the
        loss is the sum over this batch's label tokens divided by the label tokens of the step
        on all ranks, times the rank count that DDP's gradient averaging divides by again: the
        gradient of the global batch's token mean, whatever the process count.
        """
        seq2seq = self.accelerator.unwrap_model(model)
        if (
            num_items_in_batch is None
            or inputs.get("labels") is None
            or not hasattr(seq2seq, "prepare_decoder_input_ids_from_labels")
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        decoder_input_ids = seq2seq.prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**features, decoder_input_ids=decoder_input_ids)
        logits = outputs.logits
        total = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1),
            labels.to(logits.device).flatten(),
            ignore_index=LABEL_PAD_ID,
            reduction="sum",
        )
        loss = total / num_items_in_batch * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.loop_started is None:  # the clock starts with the first batch
            self.loop_started = time.perf_counter()
        self.meter.add(inputs, self.pad_id)
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        train_collator = self.data_collator
        if self.eval_collator is not None:
            if hasattr(self.eval_collator, "set_epoch"):
                self.eval_collator.set_epoch(0)  # same noise every evaluation: comparable
            self.data_collator = self.eval_collator
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = train_collator
            self.eval_seconds += time.perf_counter() - started

    def total_meter(self) -> TokenMeter:
        """Tokens over all processes and, after a resume, the earlier runs too."""
        return self.prior_meter.merged(self.run_meter())

    def run_meter(self) -> TokenMeter:
        """Tokens of this run over all ranks (a collective: every rank must call it)."""
        if self.args.world_size <= 1:
            return self.meter
        values = torch.tensor(
            [getattr(self.meter, k) for k in TokenMeter.__dataclass_fields__],
            device=self.args.device,
            dtype=torch.long,
        )
        values = self.accelerator.reduce(values, reduction="sum")
        return TokenMeter(*[int(v) for v in values.tolist()])

    def train_seconds(self) -> float:
        if self.loop_started is None:
            return 1e-9
        return max(time.perf_counter() - self.loop_started - self.eval_seconds, 1e-9)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Trainer logs on every rank at the same steps, so the counts can be summed here.
        if "loss" in logs:
            run, seconds = self.run_meter(), self.train_seconds()
            total = self.prior_meter.merged(run)
            logs["tokens_seen"] = total.tokens
            logs["tokens_per_second"] = round(run.tokens / seconds, 2)
            logs["train_seconds"] = round(seconds, 3)
            if total.nonpad_fraction is not None:
                logs["nonpad_fraction"] = round(total.nonpad_fraction, 4)
        super().log(logs, *args, **kwargs)


class EpochNoiseCallback(TrainerCallback):
    """Re-seed the collator each epoch (Trainer does not); mid-epoch on resume."""

    def __init__(self, collator, resume_step: int) -> None:
        self.collator = collator
        self.resume_step = resume_step
        self.epoch: int | None = None

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not hasattr(self.collator, "set_epoch"):
            return
        if self.epoch is None:
            ga = args.gradient_accumulation_steps
            batches = len(train_dataloader) if train_dataloader is not None else 0
            per_epoch = max(math.ceil(batches / ga), 1) if batches else 1
            self.epoch = state.global_step // per_epoch
            skipped = (state.global_step % per_epoch) * ga if self.resume_step else 0
            self.collator.set_epoch(self.epoch, start_batch=skipped)
        else:
            self.epoch += 1
            self.collator.set_epoch(self.epoch)


class CompleteCheckpointCallback(TrainerCallback):
    """After Trainer saved a checkpoint: token counts, then the _COMPLETE marker (+upload)."""

    def __init__(self, trainer: LakehouseTrainer, store: CheckpointStore) -> None:
        self.trainer = trainer
        self.store = store

    def on_save(self, args, state, control, **kwargs):
        # A collective on every rank: it also waits for every rank's own file in the checkpoint
        # (Trainer writes rng_state_<rank>.pth on each), so the marker below lists them all.
        meter = self.trainer.total_meter()
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        (folder / METER_FILE).write_text(json.dumps(meter.to_dict()))
        self.store.mark_complete(folder)
        self.store.prune_remote()
        log.info("checkpoint %s complete (step %d)", folder.name, state.global_step)


class StepProgressCallback(TrainerCallback):
    """Calls `report(step, max_steps)` on rank 0 about 50 times a run (progress artifact)."""

    def __init__(self, report: Callable[[int, int], None], max_steps: int) -> None:
        self.report = report
        self.max_steps = max_steps
        self.every = max(1, max_steps // 50)  # visible, not chatty

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.report(state.global_step, self.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if state.is_world_process_zero and (step % self.every == 0 or step >= self.max_steps):
            self.report(step, self.max_steps)


class SacreBleu:
    """`compute_metrics` for supervised runs: corpus BLEU and chrF of the generated text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, pred) -> dict[str, float]:
        import sacrebleu

        tok = self.tokenizer
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.where(preds < 0, tok.pad_token_id, preds)
        labels = np.where(pred.label_ids == LABEL_PAD_ID, tok.pad_token_id, pred.label_ids)
        hyp = [t.strip() for t in tok.batch_decode(preds, skip_special_tokens=True)]
        ref = [t.strip() for t in tok.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": sacrebleu.corpus_bleu(hyp, [ref]).score,
            "chrf": sacrebleu.corpus_chrf(hyp, [ref]).score,
        }


def training_arguments(
    *,
    local_dir: Path,
    train: TrainParams,
    device: Mapping[str, Any],
    has_eval: bool,
    processes: int = 1,
) -> Seq2SeqTrainingArguments:
    """Seq2SeqTrainingArguments from train.* (extra_args pass through by their own names).

    `train.batch_size` is the global batch of one micro-step: each of `processes` ranks takes
    `batch_size // processes` (the flow refuses sizes that do not divide).
    """
    cpu = device["device"] == "cpu"
    per_process = train.batch_size // processes
    kwargs: dict[str, Any] = {
        "output_dir": str(local_dir),
        "max_steps": train.max_steps,
        "per_device_train_batch_size": per_process,
        "per_device_eval_batch_size": per_process,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
        "weight_decay": train.weight_decay,
        "warmup_steps": train.warmup_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "seed": train.seed,
        "data_seed": train.seed,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": train.eval_steps,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,
        "report_to": "none",
        # Under torchrun the output is a log, not a terminal: Trainer prints its logs instead.
        "disable_tqdm": processes > 1,
        "use_cpu": cpu,
        "bf16": bool(device.get("bf16")),
        "dataloader_num_workers": train.dataloader_num_workers,
        "dataloader_persistent_workers": False,  # workers must see set_epoch (tasks.train.noise)
        "remove_unused_columns": False,
        "predict_with_generate": train.objective == "supervised",
        "generation_max_length": train.generation_max_length,
        "generation_num_beams": train.num_beams,
    }
    if processes > 1:
        kwargs.update(ddp_backend="gloo" if cpu else "nccl", ddp_find_unused_parameters=False)
    if train.objective == "supervised":
        kwargs.update(train_sampling_strategy="group_by_length", length_column_name="length")
    kwargs.update(train.extra_args)
    try:
        return Seq2SeqTrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(
            f"invalid training settings (train.* / train.extra_args): {exc}"
        ) from None
