"""Watch flow: announce each new landing file with a `lakehouse.landing.arrived` event.

The `pipeline` deployment has a trigger on that event which runs the pipeline for exactly the
announced file (its `data_files` parameter comes from the event payload).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL

from flows.params import PipelineParams
from flows.results import WatchResult
from tasks.lakehouse.layout import landing_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.landing.tasks import announce_file, publish_watch, scan_landing


@flow(name="watch", log_prints=True)
def watch_flow(params: PipelineParams = PipelineParams()) -> WatchResult:
    """List <lakehouse>/landing/<dataset>/ and emit an event per file not seen before."""
    logger = get_run_logger()
    lh, src = params.lakehouse, params.source
    ds = src.dataset_key
    uri = open_lakehouse(lh.root, lh.block).uri(landing_dir(ds))

    # Without PREFECT_API_URL the events go to a temporary server that no trigger listens to:
    # announce without recording, so the files are still new for the real server.
    record = bool(PREFECT_API_URL.value())
    if not record:
        logger.warning(
            "PREFECT_API_URL is not set: events go to a temporary server and trigger "
            "nothing; files are not marked as announced"
        )
    scan = scan_landing(root=lh.root, block=lh.block, dataset_key=ds, language=src.language_key)
    announced = [
        f
        for f in scan["new"]
        if announce_file(root=lh.root, block=lh.block, dataset_key=ds, file=f, record=record)
    ]
    publish_watch(dataset_key=ds, announced=announced)
    msg = (
        f"announced {len(announced)} new file(s) in {uri}" if announced else f"nothing new in {uri}"
    )
    logger.info(msg)
    return WatchResult(
        announced=[f["uri"] for f in announced],
        already_ingested=scan["ingested"],
        already_announced=scan["announced"],
        uri=uri,
        message=msg,
    )
