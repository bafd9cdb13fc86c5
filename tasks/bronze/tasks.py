"""Prefect tasks of the bronze layer: thin wrappers over tasks.bronze.ingest."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.events import emit_event

from blocks.secret import load_secret
from tasks.bronze import ingest as bronze
from tasks.lakehouse.layout import batch_dir, bronze_dir, manifest_path, stable_id
from tasks.lakehouse.storage import open_lakehouse
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES


@task(name="resolve-source", **STORAGE_RETRIES)
def resolve_source(
    root: str,
    block: str | None,
    dataset: str,
    name: str | None,
    data_files: str | list[str] | None,
    split: str,
    revision: str | None,
    token_secret: str | None,
    dataset_key: str,
    language: str,
) -> dict[str, Any]:
    """List the source's units and which of them are new, already ingested or changed."""
    lake = open_lakehouse(root, block)
    token = load_secret(token_secret)
    units = bronze.resolve_units(dataset, name, data_files, split, revision, token, lake)
    plan = bronze.plan_units(lake, dataset_key, language, units)
    if plan.changed:
        quarantine_changed(lake, dataset_key, language, plan.changed, units)
    return {
        "todo": [u.to_dict() for u in plan.todo],
        "skipped": plan.skipped,
        "changed": plan.changed,
    }


@dataclass
class _BatchInLakehouse(CachePolicy):
    """Cache key part: the unit's batch as it is in the lakehouse right now.

    Inputs + task source alone would let a cached result claim a commit after the lakehouse was
    wiped or recreated at the same root. A committed batch contributes its manifest's hash; an
    uncommitted one a fresh value, so pending work is never answered from a cache.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        lake = open_lakehouse(inputs["root"], inputs["block"])
        unit = bronze.SourceUnit(**inputs["unit"])
        batch_id = bronze.batch_id_for(inputs["dataset_key"], inputs["language"], unit)
        try:
            raw = lake.read_bytes(
                manifest_path(bronze_dir(inputs["dataset_key"], inputs["language"]), batch_id)
            )
        except FileNotFoundError:
            return f"pending:{uuid.uuid4().hex}"
        return f"committed:{hashlib.sha256(raw).hexdigest()}"


@task(
    name="ingest-unit",
    cache_policy=INPUTS + TASK_SOURCE + _BatchInLakehouse(),
    persist_result=True,
    **STORAGE_RETRIES,
)
def ingest_unit(
    root: str,
    block: str | None,
    unit: dict[str, Any],
    dataset_key: str,
    language: str,
    split: str,
    name: str | None,
    text_column: str,
    target_column: str | None,
    token_secret: str | None,
    rows_per_part: int,
    max_rows: int | None,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Ingest one file or shard as one bronze batch (idempotent: same unit, same batch)."""
    logger = get_run_logger()
    lake = open_lakehouse(root, block)
    manifest, committed = bronze.ingest_unit(
        lake,
        bronze.SourceUnit(**unit),
        dataset_key=dataset_key,
        language=language,
        split=split,
        name=name,
        text_column=text_column,
        target_column=target_column,
        token=load_secret(token_secret),
        rows_per_part=rows_per_part,
        max_rows=max_rows,
        parameters=parameters,
        work_dir=bronze.default_work_dir(),
    )
    uri = lake.uri(batch_dir(manifest.table, manifest.batch_id))
    logger.info(
        "%s %s: %d rows in %d files -> %s",
        "committed" if committed else "already committed by another run",
        unit["uri"],
        manifest.rows,
        len(manifest.files),
        uri,
    )
    return {
        "batch_id": manifest.batch_id,
        "rows": manifest.rows,
        "committed": committed,
        "uri": uri,
        "files": [f.model_dump() for f in manifest.files],
    }


@task(name="publish-bronze")
def publish_bronze(
    root: str, block: str | None, dataset_key: str, language: str, batches: list[dict[str, Any]]
) -> None:
    """Emit lakehouse.bronze.committed and a table artifact for what this run committed."""
    committed = [b for b in batches if b["committed"]]
    if not committed:
        return
    lake = open_lakehouse(root, block)
    emit_event(
        event="lakehouse.bronze.committed",
        resource={
            "prefect.resource.id": f"lakehouse.bronze.{dataset_key}.{language}",
            "prefect.resource.name": f"bronze {dataset_key}/{language}",
        },
        payload={
            "batch_ids": [b["batch_id"] for b in committed],
            "uris": [b["uri"] for b in committed],
            "rows": sum(b["rows"] for b in committed),
            "table": lake.uri(bronze_dir(dataset_key, language)),
        },
    )
    create_table_artifact(
        key=artifact_key("bronze", dataset_key, language),
        table=[
            {"batch": b["batch_id"], "file": f["path"], "rows": f["rows"], "bytes": f["bytes"]}
            for b in committed
            for f in b["files"]
        ],
        description=f"Bronze files committed to {lake.uri(bronze_dir(dataset_key, language))}",
    )


def quarantine_changed(
    lake, dataset_key: str, language: str, changed: list[str], units: list[bronze.SourceUnit]
) -> None:
    """Record sources whose content changed after ingestion; they are not re-ingested."""
    by_uri = {u.uri: u for u in units}
    for uri in changed:
        key = stable_id(uri, by_uri[uri].fingerprint)
        rel = f"{bronze_dir(dataset_key, language)}/_quarantine/{key}.json"
        lake.write_bytes(
            rel,
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
