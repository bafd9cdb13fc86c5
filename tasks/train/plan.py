"""The plan of a training run: which committed silver it reads and what the run is called.

Planning runs before anything heavy (no model is loaded, no dataset read), so a run that cannot
work fails in seconds with a message: no silver for this tokenizer, an objective the model's
tokenizer cannot do, lengths too small. The run name is a stable id of the data and the settings
that change the result; it names the checkpoint folder, so a re-run after a crash finds its
checkpoints, and the MLflow run is keyed by it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lakehouse.layout import models_dir, slug, stable_id
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
from tasks.train.data import (
    SilverSnapshot,
    find_silver,
    tokenizer_fingerprint,
    tokenizer_key,
)
from tasks.train.model import load_tokenizer
from tasks.train.objectives import Lengths, check_objective, objective_lengths

# The settings that change what training computes. `processes` is not one of them: with a
# global `batch_size` the steps, the data order and the learning rate do not depend on it, so a
# run resumes with another process count (README, Training).
RUN_IDENTITY_KEYS = (
    "objective",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "seed",
    "eval_fraction",
    "noise_density",
    "mean_noise_span_length",
    "mask_ratio",
    "poisson_lambda",
)


@dataclass(frozen=True)
class TrainPlan:
    """What a training run reads and where it writes; made by `build_train_plan`, never changed."""

    root: str
    block: str | None
    table: str
    table_uri: str
    tokenizer_key: str
    tokenizer_fingerprint: str
    silver: SilverSnapshot  # the pinned silver version this run reads
    columns: tuple[str, ...]
    lengths: Lengths
    run_name: str
    local_dir: str
    remote_rel: str | None
    output_uri: str

    @property
    def batch_ids(self) -> list[str]:
        return [b.batch_id for b in self.silver.batches]

    @property
    def rows(self) -> int:
        return self.silver.rows

    def manifest_documents(self) -> list[dict[str, Any]]:
        """One lineage record per silver batch of the pinned version (MLflow records these)."""
        return self.silver.lineage()


def work_dir() -> Path:
    """Local scratch for training (checkpoints of az:// runs, datasets cache)."""
    d = Path(os.environ.get("LAKEHOUSE_WORK_DIR", ".work")) / "train"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


def run_identity(table: str, batch_ids: list[str], model: ModelParams, train: TrainParams) -> str:
    """Stable run name: same silver batches, model and training settings -> same name."""
    key = stable_id(
        table,
        ",".join(sorted(batch_ids)),
        model.name_or_path,
        model.max_source_length,
        model.max_target_length,
        *[f"{k}={getattr(train, k)}" for k in RUN_IDENTITY_KEYS],
        length=12,
    )
    base = Path(model.name_or_path.rstrip("/")).name or model.name_or_path
    return f"{slug(base) or 'model'}-{train.objective}-{key}"


def build_train_plan(
    *,
    lakehouse: LakehouseParams,
    source: SourceParams,
    model: ModelParams,
    train: TrainParams,
) -> TrainPlan:
    """Find the silver for the model's tokenizer, check the objective; name the run."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    name = model.name_or_path
    tokenizer = load_tokenizer(name, model.revision)
    fingerprint = tokenizer_fingerprint(tokenizer)
    tok_key = tokenizer_key(name, tokenizer)
    silver = find_silver(lake, source.dataset_key, source.language_key, tok_key, name, fingerprint)
    table, columns = silver.table, set(silver.columns)
    check_objective(
        train.objective,
        tokenizer,
        columns,
        name,
        model.max_source_length,
        train.noise_density,
        train.mean_noise_span_length,
    )
    lengths = objective_lengths(
        train.objective,
        model.max_source_length,
        model.max_target_length,
        train.noise_density,
        train.mean_noise_span_length,
    )
    run_name = run_identity(table, [b.batch_id for b in silver.batches], model, train)
    output = train.output_dir
    if output and output.startswith("az://"):
        remote_rel, local_dir = lake.rel(output), work_dir() / run_name
    elif output:
        remote_rel, local_dir = None, Path(output).expanduser().resolve()
    elif lake.is_local:
        remote_rel, local_dir = None, lake.local_path(models_dir(run_name))
    else:
        remote_rel, local_dir = models_dir(run_name), work_dir() / run_name
    return TrainPlan(
        root=lakehouse.root,
        block=lakehouse.block,
        table=table,
        table_uri=lake.uri(table),
        tokenizer_key=tok_key,
        tokenizer_fingerprint=fingerprint,
        silver=silver,
        columns=tuple(sorted(columns)),
        lengths=lengths,
        run_name=run_name,
        local_dir=str(local_dir),
        remote_rel=remote_rel,
        output_uri=lake.uri(remote_rel) if remote_rel else str(local_dir),
    )
