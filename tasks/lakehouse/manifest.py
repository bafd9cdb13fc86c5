"""Batch manifests and the manifest-last commit protocol.

A batch is committed when its `_manifest.json` exists. The manifest is written last and
create-only; it lists every data file with rows, bytes and sha256, so readers read exactly the
files it names and ignore anything else in the folder (leftovers of a crashed attempt).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel, Field

from tasks.code_version import code_version
from tasks.lakehouse.layout import BATCH_PREFIX, MANIFEST, batch_dir, manifest_path
from tasks.lakehouse.storage import Lakehouse


class FileEntry(BaseModel):
    """One data file of a batch."""

    path: str = Field(description="File name relative to the batch folder.")
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """The commit record of one batch."""

    batch_id: str
    layer: str
    dataset: str
    language: str
    table: str = Field(description="Table folder relative to the lakehouse root.")
    files: list[FileEntry]
    rows: int
    parents: list[str] = Field(default_factory=list, description="Parent batch ids.")
    sources: list[dict[str, Any]] = Field(default_factory=list)
    schema_: dict[str, str] = Field(default_factory=dict, alias="schema")
    parameters: dict[str, Any] = Field(default_factory=dict)
    rejected: dict[str, int] = Field(default_factory=dict, description="Counts by reason.")
    extra: dict[str, Any] = Field(default_factory=dict)
    code_version: str = Field(default_factory=lambda: code_version())
    committed_at: str = Field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    )

    model_config = {"populate_by_name": True}

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(by_alias=True, indent=2) + "\n").encode("utf-8")

    def file_paths(self) -> list[str]:
        """Data files, relative to the lakehouse root."""
        return [f"{batch_dir(self.table, self.batch_id)}/{f.path}" for f in self.files]


class CommitConflict(RuntimeError):
    """Another writer committed the same batch with different content."""


def commit_batch(lake: Lakehouse, manifest: Manifest) -> bool:
    """Write the manifest create-only. True if this call committed; False if already committed.

    A concurrent writer that committed the same batch first wins; we then return False (the
    caller treats it as "committed by someone else") after checking it covers the same sources.
    """
    rel = manifest_path(manifest.table, manifest.batch_id)
    try:
        return lake.create_only(rel, manifest.to_bytes())
    except FileExistsError:
        other = read_manifest(lake, manifest.table, manifest.batch_id)
        if (
            other is None
            or sorted(other.parents) != sorted(manifest.parents)
            or [s.get("fingerprint") for s in other.sources]
            != [s.get("fingerprint") for s in manifest.sources]
        ):
            raise CommitConflict(
                f"{lake.uri(rel)} was committed by another writer for different inputs"
            ) from None
        return False


def commit_own_batch(lake: Lakehouse, manifest: Manifest) -> bool:
    """Commit; True when `manifest` is the committed one, False when another writer won.

    Our own bytes found after a lost response (the SDK retried and met the blob it had written)
    count as our commit: the manifest names this attempt's part files, so no one else can have
    written the same bytes.
    """
    if commit_batch(lake, manifest):
        return True
    return read_manifest(lake, manifest.table, manifest.batch_id) == manifest


def read_manifest(lake: Lakehouse, table: str, batch_id: str) -> Manifest | None:
    """The manifest of a batch, or None when it is not committed."""
    rel = manifest_path(table, batch_id)
    try:
        raw = lake.read_bytes(rel)
    except FileNotFoundError:
        return None
    return Manifest.model_validate_json(raw)


def list_batches(lake: Lakehouse, table: str) -> list[str]:
    """Batch ids with a folder under `table` (committed or not)."""
    return [
        name[len(BATCH_PREFIX) :] for name in lake.listdir(table) if name.startswith(BATCH_PREFIX)
    ]


def committed_manifests(lake: Lakehouse, table: str) -> list[Manifest]:
    """Manifests of committed batches under `table`, oldest commit first."""
    out = []
    for batch_id in list_batches(lake, table):
        m = read_manifest(lake, table, batch_id)
        if m is not None:
            out.append(m)
    return sorted(out, key=lambda m: (m.committed_at, m.batch_id))


def clean_uncommitted(lake: Lakehouse, table: str, batch_id: str) -> None:
    """Remove the leftovers of a crashed attempt, if the batch is not committed."""
    if not lake.exists(manifest_path(table, batch_id)):
        lake.rm(batch_dir(table, batch_id))


def manifest_json(m: Manifest) -> dict[str, Any]:
    return json.loads(m.to_bytes())


__all__ = [
    "MANIFEST",
    "CommitConflict",
    "FileEntry",
    "Manifest",
    "clean_uncommitted",
    "commit_batch",
    "commit_own_batch",
    "committed_manifests",
    "list_batches",
    "read_manifest",
]
