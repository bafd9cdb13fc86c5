"""TODO docstring."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.lakehouse.layout import models_dir, slug, stable_id
from tasks.lakehouse.storage import open_lakehouse
from tasks.train.data import (
    find_silver,
    silver_columns,
    tokenizer_fingerprint,
    tokenizer_key,
)
from tasks.train.model import load_tokenizer
from tasks.train.objectives import check_objective, objective_lengths

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


def work_dir() -> Path:
    """Local scratch for training (checkpoints of az:// runs, datasets cache)."""
    d = Path(os.environ.get("LAKEHOUSE_WORK_DIR", ".work")) / "train"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


def run_identity(
    table: str, batch_ids: list[str], model_name: str, model: Mapping, train: Mapping
) -> str:
    """Stable run name: same silver batches, model and training settings -> same name."""
    key = stable_id(
        table,
        ",".join(sorted(batch_ids)),
        model_name,
        model.get("max_source_length"),
        model.get("max_target_length"),
        *[f"{k}={train.get(k)}" for k in RUN_IDENTITY_KEYS],
        length=12,
    )
    base = Path(model_name.rstrip("/")).name or model_name
    return f"{slug(base) or 'model'}-{train['objective']}-{key}"


def plan_training(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    model: Mapping[str, Any],
    train: Mapping[str, Any],
) -> dict[str, Any]:
    """Find the silver for the model's tokenizer, check the objective; name the run."""
    lake = open_lakehouse(root, block)
    name = model["name_or_path"]
    tokenizer = load_tokenizer(name, model.get("revision"))
    fingerprint = tokenizer_fingerprint(tokenizer)
    tok_key = tokenizer_key(name, tokenizer)
    table, manifests = find_silver(lake, dataset_key, language, tok_key, name, fingerprint)
    columns = silver_columns(manifests)
    check_objective(
        train["objective"],
        tokenizer,
        columns,
        name,
        model["max_source_length"],
        train["noise_density"],
        train["mean_noise_span_length"],
    )
    lengths = objective_lengths(
        train["objective"],
        model["max_source_length"],
        model["max_target_length"],
        train["noise_density"],
        train["mean_noise_span_length"],
    )
    batch_ids = [m.batch_id for m in manifests]
    run_name = run_identity(table, batch_ids, name, model, train)
    output = train.get("output_dir")
    if output and output.startswith("az://"):
        remote_rel, local_dir = lake.rel(output), work_dir() / run_name
    elif output:
        remote_rel, local_dir = None, Path(output).expanduser().resolve()
    elif lake.is_local:
        remote_rel, local_dir = None, lake.local_path(models_dir(run_name))
    else:
        remote_rel, local_dir = models_dir(run_name), work_dir() / run_name
    return {
        "root": root,
        "block": block,
        "table": table,
        "table_uri": lake.uri(table),
        "tokenizer_key": tok_key,
        "tokenizer_fingerprint": fingerprint,
        "batch_ids": batch_ids,
        "rows": sum(m.rows for m in manifests),
        "manifests": [json.loads(m.to_bytes()) for m in manifests],
        "columns": sorted(columns),
        "lengths": lengths,
        "run_name": run_name,
        "local_dir": str(local_dir),
        "remote_rel": remote_rel,
        "output_uri": lake.uri(remote_rel) if remote_rel else str(local_dir),
    }
