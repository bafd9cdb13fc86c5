"""TODO docstring."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.train.checkpoints import METER_FILE, CheckpointStore
from tasks.train.collators import (
    LABEL_PAD_ID,
)
from tasks.train.data import (
    TrainingError,
)
from tasks.train.metrics import (
    TokenMeter,
)
from tasks.train.objectives import pair_batch_order


def trainer_class():
    from transformers import Seq2SeqTrainer

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

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if (
                self.args.train_sampling_strategy == "group_by_length"
                and self.args.world_size <= 1
                and "length" in ds.column_names
            ):
                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return _pair_length_sampler(list(ds["length"]), batch)
            return super()._get_train_sampler(train_dataset)

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
            if self.args.world_size <= 1:
                return self.meter
            import torch

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
            if "loss" in logs and self.args.world_size <= 1:
                total = self.total_meter()
                logs["tokens_seen"] = total.tokens
                logs["tokens_per_second"] = round(self.meter.tokens / self.train_seconds(), 2)
                if total.nonpad_fraction is not None:
                    logs["nonpad_fraction"] = round(total.nonpad_fraction, 4)
            super().log(logs, *args, **kwargs)

    return LakehouseTrainer


def _pair_length_sampler(lengths: list[int], batch_size: int):
    """A Trainer sampler over `pair_batch_order` (a new order each epoch)."""
    from torch.utils.data import Sampler

    class PairLengthSampler(Sampler):
        def __len__(self) -> int:
            return len(lengths)

        def __iter__(self):
            return iter(pair_batch_order(lengths, batch_size))

    return PairLengthSampler()


def trainer_callbacks(collator, store: CheckpointStore, resume_step: int):
    from transformers import TrainerCallback

    class EpochNoiseCallback(TrainerCallback):
        """Re-seed the collator each epoch (Trainer does not); mid-epoch on resume."""

        def __init__(self) -> None:
            self.epoch: int | None = None

        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if not hasattr(collator, "set_epoch"):
                return
            if self.epoch is None:
                ga = args.gradient_accumulation_steps
                batches = len(train_dataloader) if train_dataloader is not None else 0
                per_epoch = max(math.ceil(batches / ga), 1) if batches else 1
                self.epoch = state.global_step // per_epoch
                skipped = (state.global_step % per_epoch) * ga if resume_step else 0
                collator.set_epoch(self.epoch, start_batch=skipped)
            else:
                self.epoch += 1
                collator.set_epoch(self.epoch)

    class CompleteCheckpointCallback(TrainerCallback):
        """After Trainer saved a checkpoint: token counts, then the _COMPLETE marker (+upload)."""

        def __init__(self) -> None:
            self.trainer = None

        def on_save(self, args, state, control, **kwargs):
            meter = self.trainer.total_meter() if self.trainer is not None else None
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                return
            if meter is not None:
                (folder / METER_FILE).write_text(json.dumps(meter.to_dict()))
            store.mark_complete(folder)
            store.prune_remote()

    return EpochNoiseCallback(), CompleteCheckpointCallback()


# Training


def sacrebleu_metrics(tokenizer) -> Callable:
    import numpy as np
    import sacrebleu

    def compute(pred) -> dict[str, float]:
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(pred.label_ids == LABEL_PAD_ID, tokenizer.pad_token_id, pred.label_ids)
        hyp = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        ref = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": sacrebleu.corpus_bleu(hyp, [ref]).score,
            "chrf": sacrebleu.corpus_chrf(hyp, [ref]).score,
        }

    return compute


def training_arguments(
    local_dir: Path,
    train: Mapping[str, Any],
    device: Mapping[str, Any],
    has_eval: bool,
    objective: str,
    **overrides: Any,
):
    """Seq2SeqTrainingArguments from train.* (extra_args pass through by their own names)."""
    from transformers import Seq2SeqTrainingArguments

    cpu = device["device"] == "cpu"
    kwargs: dict[str, Any] = {
        "output_dir": str(local_dir),
        "max_steps": train["max_steps"],
        "per_device_train_batch_size": train["batch_size"],
        "per_device_eval_batch_size": train["batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "learning_rate": train["learning_rate"],
        "weight_decay": train["weight_decay"],
        "warmup_steps": train["warmup_steps"],
        "lr_scheduler_type": train["lr_scheduler_type"],
        "seed": train["seed"],
        "data_seed": train["seed"],
        "save_strategy": "steps",
        "save_steps": train["save_steps"],
        "save_total_limit": train.get("save_total_limit"),
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": train["eval_steps"],
        "logging_steps": train["logging_steps"],
        "logging_first_step": True,
        "report_to": "none",
        "disable_tqdm": False,
        "use_cpu": cpu,
        "bf16": bool(device.get("bf16")),
        "dataloader_num_workers": train.get("dataloader_num_workers", 0),
        "dataloader_persistent_workers": False,  # workers must see set_epoch (collators doc)
        "remove_unused_columns": False,
        "predict_with_generate": objective == "supervised",
        "generation_max_length": train.get("generation_max_length", 64),
        "generation_num_beams": train.get("num_beams", 1),
    }
    if objective == "supervised":
        kwargs.update(train_sampling_strategy="group_by_length", length_column_name="length")
    kwargs.update(train.get("extra_args") or {})
    kwargs.update(overrides)
    try:
        return Seq2SeqTrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(
            f"invalid training settings (train.* / train.extra_args): {exc}"
        ) from None
