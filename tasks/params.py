"""Typed, validated parameter sections: the flows' parameters, the YAML configs' keys.

One frozen model per concern, reusing the names users know from `datasets` and
`Seq2SeqTrainingArguments`. Validated once at the edge (flows/params.py loads configs and
`--set` overrides into them); tasks receive these sections, never dicts, and never mutate them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.lakehouse.layout import slug
from tasks.secrets import refuse_secrets


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Settings that no longer exist, by dotted name, with why: an error says so, not
    # "extra inputs are not permitted".
    _removed_settings: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_removed_settings_or_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for dotted, why in cls._removed_settings.items():
                if dotted.rsplit(".", 1)[-1] in data:
                    raise ValueError(f"{dotted} was removed: {why}; drop the setting")
            for key, value in data.items():
                if not isinstance(value, dict | BaseModel):
                    refuse_secrets(value, f"{cls.__name__}.{key}")
        return data


class LakehouseParams(_Model):
    """Where the lakehouse lives."""

    root: str = Field(
        "./lakehouse",
        description="Lakehouse root: a local folder, or az://container/prefix (abfs:// also "
        "accepted). Azure roots need `block`.",
    )
    block: str | None = Field(
        None,
        description="Name of the LakehouseStorage block holding the Azure credentials. "
        "Never a key or connection string.",
    )

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("lakehouse.root is empty: give a folder or az://container/prefix")
        if v.startswith(("abfs://", "abfss://")):
            # abfs[s]://container@account.dfs.core.windows.net/prefix -> az://container/prefix
            m = re.match(r"abfss?://([^@/]+)@[^/]+/?(.*)$", v)
            if m:
                v = f"az://{m.group(1)}/{m.group(2)}".rstrip("/")
            else:
                v = "az://" + v.split("://", 1)[1]
        if "://" in v and not v.startswith(("az://", "file://")):
            raise ValueError(
                f"lakehouse.root={v!r}: unsupported scheme; use a local folder or az://"
            )
        return v.rstrip("/") if v != "/" else v

    @property
    def is_azure(self) -> bool:
        return self.root.startswith("az://")


class SourceParams(_Model):
    """What to ingest: anything `datasets.load_dataset` takes."""

    _removed_settings = {
        "source.streaming": "bronze always streams its units (`load_dataset(..., "
        "streaming=True)`: memory bounded by `source.rows_per_part`, whatever the shard size)"
    }

    dataset: str = Field(
        "json",
        description="Hub dataset id (uonlp/CulturaX), a packaged builder (json, parquet, csv, "
        "text) or a local path.",
    )
    name: str | None = Field(None, description="Dataset config name, e.g. the language `fr`.")
    data_files: str | list[str] | None = Field(
        None, description="File, glob or folder (local, or az:// inside the lakehouse account)."
    )
    split: str = Field("train", description="Split to ingest.")
    language: str | None = Field(
        None, description="Partition key in the lakehouse; defaults to `name`."
    )
    text_column: str = Field("text", description="Column holding the text.")
    target_column: str | None = Field(
        None, description="Column holding the target text, for supervised pairs."
    )
    max_rows: int | None = Field(
        None,
        ge=1,
        description="Row budget per run, shared by the units ingested at once. A unit cut "
        "short is partial: the next run goes on from its next row, until it is complete.",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="Units ingested at once (threads of the bronze flow's task runner). "
        "Default: the CPUs this process may use (affinity, and the container's CPU quota).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    token_secret: str | None = Field(
        "hf-token",
        description="Name of the Prefect Secret block with the Hugging Face token (gated "
        "datasets such as CulturaX). Missing block = anonymous.",
    )
    rows_per_part: int = Field(
        50_000,
        ge=1,
        description="Rows per parquet row group of a bronze commit (the writer holds one in "
        "memory: this bounds memory).",
    )

    @property
    def dataset_key(self) -> str:
        """The `<dataset>` folder name in the lakehouse."""
        return dataset_slug(self.dataset)

    @property
    def language_key(self) -> str:
        """The `<language>` folder name in the lakehouse."""
        return self.language or self.name or "und"

    @field_validator("language", "name")
    @classmethod
    def _lang(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-' or '.' only")
        return v


class TransformParams(_Model):
    """Cleaning, dedupe and Spark settings for silver."""

    _removed_settings = {
        "transform.direct_io": "on an Azure lakehouse the executors read bronze and write "
        "silver themselves through adlfs (no hadoop-azure jars)"
    }

    min_chars: int = Field(20, ge=0, description="Reject texts shorter than this (after cleaning).")
    max_chars: int = Field(100_000, ge=1, description="Reject texts longer than this.")
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalisation.")
    strip_control: bool = Field(True, description="Remove control characters (keep \\n, \\t).")
    collapse_whitespace: bool = Field(True, description="Collapse runs of spaces; trim lines.")
    max_replacement_ratio: float = Field(
        0.01, ge=0, le=1, description="Reject texts whose share of U+FFFD exceeds this."
    )
    min_letter_ratio: float = Field(
        0.5, ge=0, le=1, description="Reject texts whose share of letters is below this."
    )
    max_repeated_line_ratio: float = Field(
        0.5, ge=0, le=1, description="Reject texts where repeated lines exceed this share."
    )
    dedupe: bool = Field(True, description="Exact dedupe on normalised text across all batches.")
    max_tokens: int | None = Field(
        None, ge=1, description="Reject rows longer than this many tokens (None: keep all)."
    )
    spark_master: str = Field("local[*]", description="Spark master for local mode.")
    spark_remote: str | None = Field(
        None, description="Spark Connect URL (sc://host:15002); overrides spark_master."
    )
    executor_sas_minutes: int = Field(
        240,
        ge=5,
        le=7 * 24 * 60,
        description="Lifetime of the container SAS the executors get on an Azure lakehouse.",
    )
    tokenize_batch_size: int = Field(1000, ge=1, description="Rows per Arrow batch tokenized.")
    spark_driver_memory: str = Field("2g", description="spark.driver.memory in local mode.")


class ModelParams(_Model):
    """The model and its tokenizer: anything `from_pretrained` takes."""

    name_or_path: str = Field(
        ".work/models/tiny-t5", description="Hub id (google/mt5-small) or local folder."
    )
    max_source_length: int = Field(128, ge=8, description="Encoder length in tokens.")
    max_target_length: int = Field(128, ge=2, description="Decoder length in tokens.")
    revision: str | None = Field(None, description="Hub revision.")


class TrainParams(_Model):
    """Fine-tuning; extra Trainer settings keep `Seq2SeqTrainingArguments` names."""

    objective: Literal["span_corruption", "denoising", "supervised"] = Field(
        "span_corruption", description="span_corruption (T5), denoising (mBART), supervised."
    )
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    on_partial: bool = Field(
        False,
        description="The pipeline trains even when bronze left units partial under a row "
        "budget (source.max_rows). Default: it trains once a run leaves none partial (one "
        "model version per catch-up, not per chunk); the `train` flow trains whenever run.",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="Global train batch size: split evenly over `processes` (each takes "
        "batch_size / processes), so the steps and the learning rate do not depend on them.",
    )
    processes: int | Literal["auto"] = Field(
        "auto",
        description="Data-parallel training processes (torchrun; gloo on CPU, nccl on GPUs). "
        "auto: one per visible GPU, 1 on CPU.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Gradient accumulation.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: str = Field("linear")
    seed: int = Field(42, description="Seed for init, data order and noise.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto picks CUDA if present.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast where the GPU or CPU (AMX, AVX512-BF16) does bf16 "
        "natively, else fp32.",
    )
    infra: Literal["inline", "docker-cpu", "docker-gpu", "process", "auto"] = Field(
        "inline", description="Where the training subflow runs."
    )
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto resumes from the last complete checkpoint."
    )
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(3, ge=1)
    eval_steps: int = Field(20, ge=1, description="Evaluate every N steps.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Held-out share (hash of _row_id).")
    max_eval_samples: int = Field(256, ge=1)
    logging_steps: int = Field(5, ge=1)
    output_dir: str | None = Field(
        None, description="Checkpoints; default <lakehouse>/models/<run name>."
    )
    noise_density: float = Field(0.15, gt=0, lt=1)
    mean_noise_span_length: float = Field(3.0, gt=0)
    mask_ratio: float = Field(0.35, gt=0, lt=1)
    poisson_lambda: float = Field(3.5, gt=0)
    generation_max_length: int = Field(64, ge=1)
    num_beams: int = Field(1, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Other Seq2SeqTrainingArguments by their own names."
    )

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> TrainParams:
        if self.processes != "auto":
            if self.processes < 1:
                raise ValueError(f"train.processes={self.processes}: use auto or at least 1")
            if self.batch_size % self.processes:
                raise ValueError(
                    f"train.batch_size={self.batch_size} is the global batch and must divide "
                    f"evenly over train.processes={self.processes}: use a multiple of it"
                )
        return self


class TrackingParams(_Model):
    """MLflow tracking and registry."""

    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("lakehouse-seq2seq", description="MLflow experiment name.")
    registered_model: str = Field("lakehouse-seq2seq", description="Registry model name.")
    token_secret: str | None = Field(
        "mlflow-token", description="Prefect Secret block with the MLflow token (if secured)."
    )
    champion_metric: str = Field(
        "eval_loss",
        description="Metric that decides the champion, computed for candidate and champion on "
        "the candidate's held-out rows: eval_loss, eval_bleu, eval_chrf (supervised) or "
        "eval_span_exact (span corruption, denoising).",
    )
    champion_greater_is_better: bool = Field(False)
    champion_min_delta: float = Field(
        0.01,
        ge=0,
        description="The candidate becomes champion only when it beats the champion by more "
        "than this (in the metric's units); a tie keeps the champion.",
    )


class PipelineParams(_Model):
    """All parameters of the pipeline; each layer flow takes the same model."""

    lakehouse: LakehouseParams = Field(default_factory=LakehouseParams)
    source: SourceParams = Field(default_factory=SourceParams)
    transform: TransformParams = Field(default_factory=TransformParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineParams:
        if self.lakehouse.is_azure and not self.lakehouse.block:
            raise ValueError(
                "lakehouse.root is an Azure URI but lakehouse.block is not set: create a "
                "LakehouseStorage block (`python -m blocks create`) and pass its name."
            )
        if self.train.objective == "supervised" and not self.source.target_column:
            raise ValueError(
                "train.objective=supervised needs source.target_column (source/target pairs)"
            )
        return self


def dataset_slug(dataset: str) -> str:
    """Folder-safe name for a dataset id or path (uonlp/CulturaX -> uonlp__CulturaX)."""
    name = dataset.rstrip("/")
    if "/" in name and not Path(name).exists() and not name.startswith((".", "/")):
        name = name.replace("/", "__")  # hub id owner/name
    else:
        name = Path(name).name or name
    return slug(name) or "dataset"


def flatten(params: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten to dotted keys (for MLflow params and manifests)."""
    out: dict[str, Any] = {}
    for key, value in params.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value
