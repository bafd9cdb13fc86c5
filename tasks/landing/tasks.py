"""Prefect tasks of the landing-zone watcher: thin wrappers over tasks.landing.zone."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from tasks.lakehouse.storage import open_lakehouse
from tasks.landing import zone as landing
from tasks.report import artifact_key
from tasks.retry import STORAGE_RETRIES


@task(name="scan-landing", **STORAGE_RETRIES)
def scan_landing(
    *, root: str, block: str | None, dataset_key: str, language: str
) -> dict[str, Any]:
    """List landing/<dataset>/ and split it into new, already ingested and already announced."""
    lake = open_lakehouse(root, block)
    new, ingested, announced = landing.find_new_files(lake, dataset_key, language)
    get_run_logger().info(
        "%s: %d new, %d already ingested, %d already announced",
        lake.uri(landing.landing_dir(dataset_key)),
        len(new),
        len(ingested),
        len(announced),
    )
    return {"new": [f.to_dict() for f in new], "ingested": ingested, "announced": announced}


@task(name="announce-file", **STORAGE_RETRIES)
def announce_file(
    *, root: str, block: str | None, dataset_key: str, file: dict[str, Any], record: bool = True
) -> bool:
    """Claim a new file and emit lakehouse.landing.arrived for it; False if already claimed.

    `record=False` emits without claiming (nothing listens on a temporary API anyway).
    """
    lake = open_lakehouse(root, block)
    f = landing.LandingFile(**file)
    if record and not landing.claim(lake, dataset_key, f, flow_run.get_id()):
        get_run_logger().info("%s: announced by another watch run", f.uri)
        return False
    try:
        emit_event(
            event=landing.ARRIVED_EVENT,
            resource={
                "prefect.resource.id": f"lakehouse.landing.{dataset_key}",
                "prefect.resource.name": f"landing {dataset_key}",
                "lakehouse.landing.uri": f.uri,
            },
            payload=landing.event_payload(f, dataset_key, root),
        )
    except Exception:
        if record:
            landing.release(lake, dataset_key, f)  # not announced: the next run tries again
        raise
    get_run_logger().info("announced %s (%d bytes)", f.uri, f.size)
    return True


@task(name="publish-watch")
def publish_watch(*, dataset_key: str, announced: list[dict[str, Any]]) -> None:
    """A table artifact of the files announced by this run."""
    if announced:
        create_table_artifact(
            key=artifact_key("landing", dataset_key),
            table=[
                {"file": f["uri"], "bytes": f["size"], "version": f["version"]} for f in announced
            ],
            description=f"Files announced with {landing.ARRIVED_EVENT}",
        )
