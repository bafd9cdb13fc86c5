"""Prefect tasks of the lakehouse itself: table maintenance (compaction, checkpoint, vacuum)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from tasks.lakehouse.delta import open_table
from tasks.lakehouse.maintenance import MaintenanceResult, maintain_table
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import LakehouseParams
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES


@task(name="list-tables", **STORAGE_RETRIES)
def list_tables(*, lakehouse: LakehouseParams, dataset_key: str, language: str) -> list[str]:
    """The Delta tables of one dataset and language: bronze, every silver and rejected table."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    rels = [f"bronze/{dataset_key}/{language}"]
    for layer in ("silver", "rejected"):
        rels += [
            f"{layer}/{dataset_key}/{language}/{t}"
            for t in lake.listdir(f"{layer}/{dataset_key}/{language}")
        ]
    return [
        lake.table_uri(r)
        for r in rels
        if open_table(lake.table_uri(r), storage_options=lake.storage_options) is not None
    ]


@task(name="maintain-table", **STORAGE_RETRIES)
def maintain_lakehouse_table(
    *, lakehouse: LakehouseParams, table_uri: str, pinned_versions: list[int]
) -> MaintenanceResult:
    """Compact, checkpoint and vacuum one table, keeping every pinned version loadable."""
    lake = open_lakehouse(lakehouse.root, lakehouse.block)
    result = maintain_table(
        table_uri, pinned_versions=pinned_versions, storage_options=lake.storage_options
    )
    get_run_logger().info(
        "%s: v%d -> v%d, %d files compacted, checkpoint at v%d, %d files vacuumed%s",
        table_uri,
        result.version_before,
        result.version_after,
        result.files_compacted,
        result.checkpoint_version,
        result.files_vacuumed,
        f" (vacuum skipped: {result.vacuum_skipped})" if result.vacuum_skipped else "",
    )
    return result


@task(name="publish-maintenance")
def publish_maintenance(
    *, dataset_key: str, language: str, results: list[MaintenanceResult]
) -> None:
    """A table artifact: what maintenance did to each table."""
    create_table_artifact(
        key=artifact_key("maintain", dataset_key, language),
        table=[
            {
                "table": r.uri,
                "version": f"{r.version_before} -> {r.version_after}",
                "compacted": r.files_compacted,
                "vacuumed": r.files_vacuumed,
                "pinned": ", ".join(map(str, r.pinned_versions)) or "-",
                "vacuum skipped": r.vacuum_skipped or "",
            }
            for r in results
        ],
        description=f"Maintenance of {dataset_key}/{language}",
    )
