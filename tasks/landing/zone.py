"""The landing zone: files dropped under <root>/landing/<dataset>/ by upstream systems.

`find_new_files` lists the zone and keeps the files that are neither ingested into bronze nor
announced before. A file is identified by path + size + etag (Azure) or mtime (local folder);
announcing one writes a create-only marker under <root>/landing/_watch/<dataset>/, so two watch
runs at once, or a watch run after a crash, never announce the same file twice.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.layout import bronze_dir, landing_dir, stable_id
from tasks.lakehouse.storage import Lakehouse

WATCH_DIR = "landing/_watch"
ARRIVED_EVENT = "lakehouse.landing.arrived"
# https://<account>.blob.core.windows.net/<container>/<path>  (what Azure Event Grid sends)
_BLOB_URL = re.compile(r"^https?://[^/]+\.(?:blob|dfs)\.core\.windows\.net/([^/]+)/(.+)$")
_AZURITE_URL = re.compile(r"^https?://(?:127\.0\.0\.1|localhost):\d+/[^/]+/([^/]+)/(.+)$")


@dataclass(frozen=True)
class LandingFile:
    """A file in the landing zone, with what identifies this version of it."""

    uri: str
    rel: str
    size: int
    version: str  # etag on Azure, mtime in a local folder

    @property
    def key(self) -> str:
        return stable_id("landing", self.uri, self.size, self.version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_landing(lake: Lakehouse, dataset_key: str) -> list[LandingFile]:
    """All files under landing/<dataset>/ (hidden files and temporary uploads excluded)."""
    out = []
    for rel in lake.find(landing_dir(dataset_key)):
        name = rel.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or ".tmp-" in name or name.endswith((".tmp", ".part")):
            continue  # uploads in progress and markers are not data
        info = lake.info(rel)
        version = (info.get("etag") or "").strip('"') or str(
            info.get("mtime") or info.get("last_modified")
        )
        out.append(
            LandingFile(
                uri=file_uri(lake, rel), rel=rel, size=int(info.get("size") or 0), version=version
            )
        )
    return out


def file_uri(lake: Lakehouse, rel: str) -> str:
    """The URI bronze records for a lakehouse file (absolute path locally, az:// on Azure)."""
    return lake.path(rel) if lake.is_local else lake.uri(rel)


def ingested_uris(lake: Lakehouse, dataset_key: str, language: str) -> set[str]:
    """Source URIs already committed to bronze/<dataset>/<language>."""
    return {
        uri
        for b in committed_batches(lake, bronze_dir(dataset_key, language))
        for uri, _ in b.sources
    }


def marker_path(dataset_key: str, f: LandingFile) -> str:
    return f"{WATCH_DIR}/{dataset_key}/{f.key}.json"


def find_new_files(
    lake: Lakehouse, dataset_key: str, language: str
) -> tuple[list[LandingFile], list[str], list[str]]:
    """(new files, URIs already ingested, URIs already announced)."""
    done = ingested_uris(lake, dataset_key, language)
    new, ingested, announced = [], [], []
    for f in list_landing(lake, dataset_key):
        if f.uri in done:
            ingested.append(f.uri)
        elif lake.exists(marker_path(dataset_key, f)):
            announced.append(f.uri)
        else:
            new.append(f)
    return new, ingested, announced


def claim(lake: Lakehouse, dataset_key: str, f: LandingFile, run_id: str | None) -> bool:
    """Record that `f` is being announced; False when another run announced it first."""
    record = {
        **f.to_dict(),
        "announced_by": run_id,
        "announced_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        return lake.create_only(
            marker_path(dataset_key, f), json.dumps(record, sort_keys=True).encode()
        )
    except FileExistsError:
        return False


def release(lake: Lakehouse, dataset_key: str, f: LandingFile) -> None:
    """Forget a claim whose event could not be sent, so the next watch run retries it."""
    lake.rm(marker_path(dataset_key, f), recursive=False)


def event_payload(f: LandingFile, dataset_key: str, lakehouse_root: str) -> dict[str, Any]:
    """Payload of lakehouse.landing.arrived (the pipeline trigger reads `uris`)."""
    return {
        "uri": f.uri,
        "uris": [f.uri],
        "size": f.size,
        "version": f.version,
        "dataset": dataset_key,
        "lakehouse": lakehouse_root,
    }


def normalize_uri(uri: str) -> str:
    """Accept Azure blob URLs (Event Grid's `data.url`) as az://container/path."""
    uri = uri.strip()
    for pattern in (_BLOB_URL, _AZURITE_URL):
        m = pattern.match(uri)
        if m:
            from urllib.parse import unquote

            return f"az://{m.group(1)}/{unquote(m.group(2))}"
    if uri.startswith(("abfs://", "abfss://")):
        m = re.match(r"abfss?://([^@/]+)@[^/]+/(.*)$", uri)
        if m:
            return f"az://{m.group(1)}/{m.group(2)}"
    return uri
