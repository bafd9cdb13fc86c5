"""What each flow returns (`--json` prints it as one object on the last stdout line)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tasks.tracking.promotion import PromotionReport


class BronzeResult(BaseModel):
    batch_ids: list[str] = Field(default_factory=list, description="Batches committed now.")
    rows: int = Field(0, description="Rows committed now.")
    skipped_sources: list[str] = Field(default_factory=list, description="Already ingested.")
    changed_sources: list[str] = Field(
        default_factory=list, description="Changed after ingestion: quarantined, not ingested."
    )
    partial_sources: list[str] = Field(
        default_factory=list,
        description="Cut short by the row budget (source.max_rows): the next run goes on.",
    )
    pending_sources: list[str] = Field(
        default_factory=list,
        description="Not started (or not continued) this run: the row budget was spent.",
    )
    uri: str = Field("", description="The bronze table.")
    message: str = ""


class SilverResult(BaseModel):
    batch_ids: list[str] = Field(default_factory=list)
    rows: int = 0
    rejected: dict[str, int] = Field(default_factory=dict, description="Counts by reason.")
    uri: str = ""
    tokenizer: str = ""
    parent_batch_ids: list[str] = Field(default_factory=list)
    message: str = ""


class TrainResult(BaseModel):
    global_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_seen: int = 0
    tokens_per_second: float | None = None
    nonpad_fraction: float | None = None
    checkpoint_uri: str = ""
    resumed_from_step: int | None = None
    mlflow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    promotion: PromotionReport | None = Field(
        None,
        description="Base, candidate and champion scores on the candidate's held-out rows, "
        "the rows' identity, and whether the version became champion (and why).",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    message: str = ""


class PipelineResult(BaseModel):
    bronze: BronzeResult | None = None
    silver: SilverResult | None = None
    train: TrainResult | None = None


class WatchResult(BaseModel):
    announced: list[str] = Field(default_factory=list, description="Files announced now.")
    already_ingested: list[str] = Field(default_factory=list)
    already_announced: list[str] = Field(default_factory=list)
    uri: str = Field("", description="The landing prefix watched.")
    message: str = ""


class MaintainResult(BaseModel):
    tables: list[str] = Field(default_factory=list, description="Tables maintained.")
    files_vacuumed: int = 0
    pinned: dict[str, list[int]] = Field(
        default_factory=dict, description="Silver versions registered models pin (kept)."
    )
    message: str = ""
