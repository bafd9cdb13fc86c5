"""Unit tests for tasks.lakehouse.manifest: round trip and the create-only, manifest-last commit."""

from __future__ import annotations

import json

import pytest

from tasks.lakehouse.layout import batch_dir, bronze_dir, manifest_path
from tasks.lakehouse.manifest import (
    CommitConflict,
    FileEntry,
    Manifest,
    clean_uncommitted,
    commit_batch,
    committed_manifests,
    list_batches,
    read_manifest,
)
from tasks.lakehouse.storage import open_lakehouse

TABLE = bronze_dir("json", "xx")


def _manifest(batch_id: str = "b1", fingerprint: str = "sha256:aa", rows: int = 3) -> Manifest:
    return Manifest(
        batch_id=batch_id,
        layer="bronze",
        dataset="json",
        language="xx",
        table=TABLE,
        files=[FileEntry(path="part-00000-x.parquet", rows=rows, bytes=10, sha256="0" * 64)],
        rows=rows,
        sources=[{"uri": "/src/a.jsonl", "fingerprint": fingerprint}],
        schema={"text": "string", "_row_id": "string"},
        parameters={"source.split": "train"},
    )


@pytest.fixture
def lake(tmp_path):
    return open_lakehouse(str(tmp_path / "lake"))


def test_round_trip(lake):
    m = _manifest()
    assert commit_batch(lake, m) is True
    back = read_manifest(lake, TABLE, "b1")
    assert back == m
    raw = json.loads(lake.read_bytes(manifest_path(TABLE, "b1")))
    assert raw["schema"] == {"text": "string", "_row_id": "string"}  # alias on disk
    assert raw["files"][0]["sha256"] == "0" * 64 and raw["code_version"]
    assert back.file_paths() == [f"{batch_dir(TABLE, 'b1')}/part-00000-x.parquet"]


def test_commit_is_create_only(lake):
    m = _manifest()
    assert commit_batch(lake, m)
    # A retry after a lost response re-sends the same bytes: success, not a second commit.
    assert commit_batch(lake, m) is False
    # Another writer of the same inputs (other timestamps) also gets False.
    assert commit_batch(lake, _manifest()) is False
    # Different inputs under the same batch id are a conflict, and the first commit stays.
    with pytest.raises(CommitConflict, match="another writer"):
        commit_batch(lake, _manifest(fingerprint="sha256:bb"))
    assert read_manifest(lake, TABLE, "b1").sources[0]["fingerprint"] == "sha256:aa"
    assert not [n for n in lake.listdir(batch_dir(TABLE, "b1")) if ".tmp-" in n]


def test_uncommitted_folders_are_invisible_and_cleanable(lake):
    lake.write_bytes(f"{batch_dir(TABLE, 'crashed')}/part-00000-y.parquet", b"partial")
    commit_batch(lake, _manifest("b2").model_copy(update={"committed_at": "2026-01-01T00:00"}))
    commit_batch(
        lake, _manifest("b1", "sha256:cc").model_copy(update={"committed_at": "2026-01-02T00:00"})
    )
    assert sorted(list_batches(lake, TABLE)) == ["b1", "b2", "crashed"]
    assert [m.batch_id for m in committed_manifests(lake, TABLE)] == ["b2", "b1"]  # commit order
    assert read_manifest(lake, TABLE, "crashed") is None
    clean_uncommitted(lake, TABLE, "crashed")
    clean_uncommitted(lake, TABLE, "b1")  # committed: kept
    assert sorted(list_batches(lake, TABLE)) == ["b1", "b2"]
    assert committed_manifests(lake, "bronze/none/xx") == []
