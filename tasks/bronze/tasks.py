"""Prefect tasks of the bronze layer: thin wrappers over tasks.bronze.ingest."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.events import emit_event

from blocks.secret import load_secret
from tasks.bronze.ingest import UnitOutcome, default_work_dir, ingest_source_unit
from tasks.bronze.progress import UnitProgress
from tasks.bronze.sources import SourceUnit, batch_id_for, plan_units, resolve_units
from tasks.lakehouse.delta import transaction_version
from tasks.lakehouse.layout import bronze_dir, quarantine_dir, stable_id
from tasks.lakehouse.storage import Lakehouse, open_lakehouse
from tasks.params import LakehouseParams, SourceParams
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES


@dataclass(frozen=True)
class SourcePlan:
    """Units to ingest now, and the sources skipped (already in) or quarantined (changed).

    `progress` holds, by unit uri, where each partial unit (cut by the row budget) goes on.
    """

    todo: list[SourceUnit]
    skipped: list[str]
    changed: list[str]
    progress: dict[str, UnitProgress] = field(default_factory=dict)


@task(name="resolve-source", **STORAGE_RETRIES)
def resolve_source(*, lakehouse: LakehouseParams, source: SourceParams) -> SourcePlan:
    """List the source's units and which of them are new, already ingested or changed."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    token = load_secret(source.token_secret)
    units = resolve_units(
        source.dataset,
        source.name,
        source.data_files,
        source.split,
        source.revision,
        token,
        lake,
    )
    plan = plan_units(lake, source.dataset_key, source.language_key, units)
    if plan.changed:
        quarantine_changed(lake, source, plan.changed, units)
    return SourcePlan(
        todo=plan.todo, skipped=plan.skipped, changed=plan.changed, progress=plan.progress
    )


@dataclass
class _UnitInBronze(CachePolicy):
    """Cache key part: whether the chunk this task would commit is in bronze right now.

    Inputs + task source alone would let a cached result claim a commit after the lakehouse was
    wiped or recreated at the same root; pending work is never answered from a cache.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        lakehouse, source, unit = inputs["lakehouse"], inputs["source"], inputs["unit"]
        lake = open_lakehouse(lakehouse.root, lakehouse.block)
        uri = lake.table_uri(bronze_dir(source.dataset_key, source.language_key))
        app_id = batch_id_for(source.dataset_key, source.language_key, unit)
        done = transaction_version(uri, app_id, storage_options=lake.storage_options)
        progress = inputs.get("progress") or UnitProgress()
        chunk = progress.chunks + 1
        return f"committed:{app_id}:{chunk}" if done >= chunk else f"pending:{uuid.uuid4().hex}"


@task(
    name="ingest-unit",
    cache_policy=INPUTS + TASK_SOURCE + _UnitInBronze(),
    persist_result=True,
    **STORAGE_RETRIES,
)
def ingest_unit(
    *,
    lakehouse: LakehouseParams,
    source: SourceParams,
    unit: SourceUnit,
    max_rows: int | None,
    parameters: dict[str, str],
    progress: UnitProgress | None = None,
) -> UnitOutcome:
    """Ingest one file or shard (or its next chunk, under a row budget) as one bronze commit
    (idempotent: same unit and chunk, same batch)."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    outcome = ingest_source_unit(
        lake,
        unit,
        source=source,
        dataset_key=source.dataset_key,
        language=source.language_key,
        token=load_secret(source.token_secret),
        max_rows=max_rows,
        parameters=parameters,
        work_dir=default_work_dir(),
        progress=progress,
    )
    get_run_logger().info(
        "%s %s (chunk %d, rows %d-%d%s) -> %s",
        "committed" if outcome.committed else "already committed by another run",
        unit.uri,
        outcome.chunk,
        outcome.offset,
        outcome.offset + outcome.rows,
        ", partial: the next run goes on" if outcome.partial else "",
        lake.uri(bronze_dir(source.dataset_key, source.language_key)),
    )
    return outcome


@task(name="publish-bronze")
def publish_bronze(
    *,
    lakehouse: LakehouseParams,
    source: SourceParams,
    outcomes: list[UnitOutcome],
    pending: list[str] | None = None,
) -> None:
    """Emit lakehouse.bronze.committed and a table artifact for what this run committed, with
    the units left partial (cut by the row budget) and pending (not started: budget spent)."""
    committed = [o for o in outcomes if o.committed and o.rows]
    if not committed:
        return
    ds, lang = source.dataset_key, source.language_key
    table = open_lakehouse(lakehouse.root, lakehouse.block).uri(bronze_dir(ds, lang))
    emit_event(
        event="lakehouse.bronze.committed",
        resource={
            "prefect.resource.id": f"lakehouse.bronze.{ds}.{lang}",
            "prefect.resource.name": f"bronze {ds}/{lang}",
        },
        payload={
            "batch_ids": [o.batch_id for o in committed],
            "uris": [table],
            "versions": [o.table_version for o in committed],
            "rows": sum(o.rows for o in committed),
            "table": table,
        },
    )
    create_table_artifact(
        key=artifact_key("bronze", ds, lang),
        table=[
            {"batch": o.batch_id, "rows": o.rows, "table version": o.table_version}
            | (
                {"unit": o.uri, "chunk": o.chunk, "first row": o.offset, "partial": o.partial}
                if source.max_rows is not None
                else {}
            )
            for o in committed
        ],
        description=f"Bronze batches committed to {table}"
        + _budget_note([o.uri for o in outcomes if o.partial], pending or []),
    )


def _budget_note(partial: list[str], pending: list[str]) -> str:
    if not partial and not pending:
        return ""
    return (
        f"; row budget reached: {len(partial)} unit(s) partial (the next run goes on from "
        f"their next row), {len(pending)} not started: {sorted(partial)[:20]} {pending[:20]}"
    )


def quarantine_changed(
    lake: Lakehouse, source: SourceParams, changed: list[str], units: list[SourceUnit]
) -> None:
    """Record sources whose content changed after ingestion; they are not re-ingested."""
    by_uri = {u.uri: u for u in units}
    for uri in changed:
        key = stable_id(uri, by_uri[uri].fingerprint)
        lake.write_bytes(
            f"{quarantine_dir(source.dataset_key, source.language_key)}/{key}.json",
            json.dumps(
                {
                    "reason": "changed_after_ingestion",
                    "uri": uri,
                    "fingerprint": by_uri[uri].fingerprint,
                    "action": "not ingested: rename the file (new path) to ingest its new content",
                },
                indent=2,
            ).encode(),
        )


class IngestProgress:
    """A bronze run's progress artifact and log line, after each unit: units done, partial and
    pending, rows committed, and an estimate of the time left (from the pace so far: rows
    against the row budget when there is one, else units)."""

    def __init__(self, *, source: SourceParams, units: int):
        self.units, self.budget = units, source.max_rows
        self.started = time.monotonic()
        self.done = self.partial = self.rows = 0
        self.artifact_id = create_progress_artifact(
            0.0,
            key=artifact_key("bronze-progress", source.dataset_key, source.language_key),
            description=f"bronze: 0 of {units} unit(s) done",
        )

    def fraction(self) -> float:
        by_units = self.done / self.units if self.units else 1.0
        if self.budget is None:
            return by_units
        return max(by_units, min(1.0, self.rows / self.budget))

    def unit_done(self, outcome: UnitOutcome) -> None:
        self.done += 1
        self.partial += int(outcome.partial)
        self.rows += outcome.rows if outcome.committed else 0
        elapsed, fraction = time.monotonic() - self.started, self.fraction()
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        text = (
            f"bronze: {self.done} of {self.units} unit(s) done ({self.partial} partial), "
            f"{self.units - self.done} pending, {self.rows:,} rows committed, "
            f"{elapsed:.0f}s elapsed"
            + (f", about {_duration(left)} left" if left is not None and fraction < 1 else "")
        )
        update_progress_artifact(
            self.artifact_id, progress=round(100 * fraction, 1), description=text
        )
        get_run_logger().info(text)

    def finish(self, pending: int) -> None:
        """The run is over: 100%, and what the row budget left for the next run."""
        text = (
            f"bronze: {self.done} unit(s) done ({self.partial} partial), {self.rows:,} rows "
            f"committed in {time.monotonic() - self.started:.0f}s"
            + (f"; {pending} unit(s) not started (row budget spent)" if pending else "")
        )
        update_progress_artifact(self.artifact_id, progress=100.0, description=text)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
