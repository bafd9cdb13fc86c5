"""Maintenance subflow: compact, checkpoint and vacuum the lakehouse tables (weekly)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import PipelineParams
from flows.results import MaintainResult
from tasks.lakehouse.tasks import list_tables, maintain_lakehouse_table, publish_maintenance
from tasks.tracking.tasks import find_pinned_versions


@flow(name="maintain", log_prints=True)
def maintain_flow(params: PipelineParams = PipelineParams()) -> MaintainResult:
    """Compact small files, checkpoint and vacuum; versions registered models pin stay loadable."""
    lh, src = params.lakehouse, params.source
    pins = find_pinned_versions(tracking=params.tracking)
    tables = list_tables(lakehouse=lh, dataset_key=src.dataset_key, language=src.language_key)
    results = [
        maintain_lakehouse_table(lakehouse=lh, table_uri=t, pinned_versions=pins.get(t, []))
        for t in tables
    ]
    publish_maintenance(dataset_key=src.dataset_key, language=src.language_key, results=results)
    msg = f"maintained {len(results)} table(s); pinned versions kept: {pins or 'none'}"
    get_run_logger().info(msg)
    return MaintainResult(
        tables=[r.uri for r in results],
        files_vacuumed=sum(r.files_vacuumed for r in results),
        pinned=pins,
        message=msg,
    )
