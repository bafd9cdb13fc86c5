"""Table maintenance: compact small files, write a checkpoint, vacuum; pinned versions stay whole.

A version that a registered model was trained on must keep loading with the same rows: its log
is kept (ten-year log retention; nothing here deletes logs) and vacuum keeps its data files
(delta-rs `keep_versions`), checked by a dry run first and by loading each pinned version after.
Plain module (no Prefect).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import pyarrow.fs as pafs
from deltalake import CommitProperties, PostCommitHookProperties
from deltalake.fs import DeltaStorageHandler

from tasks.lakehouse.delta_access import TableError, delta_errors, plain_options
from tasks.lakehouse.tables import TOKEN_KEY, live_paths, open_table

_NO_LOG_CLEANUP = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


@dataclass(frozen=True)
class MaintenanceResult:
    """What `maintain_table` did to one table.

    Attributes:
        uri: the table.
        version_before: its version when maintenance started.
        version_after: its version at the end (compaction and vacuum commit too).
        files_compacted: small files replaced by compaction (still kept for pinned versions).
        files_written: files compaction wrote.
        checkpoint_version: the version the checkpoint was written at.
        files_vacuumed: files deleted by vacuum.
        vacuum_skipped: why vacuum did not run, or None.
        pinned_versions: the versions kept loadable.
    """

    uri: str
    version_before: int
    version_after: int
    files_compacted: int
    files_written: int
    checkpoint_version: int
    files_vacuumed: int
    vacuum_skipped: str | None
    pinned_versions: tuple[int, ...]


def maintain_table(
    uri: str,
    *,
    pinned_versions: list[int],
    storage_options: Mapping[str, str] | None = None,
    retention_hours: int | None = None,
    target_size: int | None = None,
) -> MaintenanceResult:
    """Compact small files, write a checkpoint and vacuum, keeping every pinned version whole.

    Args:
        uri: table location.
        pinned_versions: table versions that registered models were trained on.
        storage_options: from `delta_storage_options`.
        retention_hours: vacuum deletes unreferenced files older than this; default: the
            table's `delta.deletedFileRetentionDuration` (7 days). Shorter than the longest
            running write deletes that write's files before it commits: for tests only.
        target_size: compaction's target file size in bytes (delta-rs default: 100 MB).

    Returns:
        What was done; `vacuum_skipped` says why vacuum did not run, if it did not.

    Raises:
        TableError: no table, a pinned version outside the table, or one that does not load.
    """
    with delta_errors(uri, storage_options):
        table = open_table(uri, storage_options)
        before = table.version()
        pinned = tuple(sorted(set(pinned_versions)))
        if pinned and (pinned[0] < 0 or pinned[-1] > before):
            raise TableError(f"Pinned versions {list(pinned)} of {uri}: it has 0..{before}.")
        needed = set().union(*(live_paths(uri, v, storage_options) for v in pinned))
        compact = table.optimize.compact(
            target_size=target_size,
            commit_properties=CommitProperties(custom_metadata={TOKEN_KEY: "maintain"}),
            post_commithook_properties=_NO_LOG_CLEANUP,
        )
        table = open_table(uri, storage_options)
        table.create_checkpoint()
        checkpoint = table.version()
        vacuum = {
            "retention_hours": retention_hours,
            "enforce_retention_duration": retention_hours is None,
            "keep_versions": list(pinned) or None,
            "full": True,  # also files no commit references (losers of races, crashed tasks)
            "post_commithook_properties": _NO_LOG_CLEANUP,
        }
        # Vacuum also lists removed files that are long gone: count only what exists.
        listed = {unquote(p) for p in table.vacuum(dry_run=True, **vacuum)}
        doomed = _existing(uri, listed, storage_options) if listed else set()
        skipped, vacuumed = None, 0
        if clash := doomed & needed:
            skipped = (
                f"vacuum skipped: it would delete {len(clash)} file(s) that pinned versions "
                f"need (e.g. {sorted(clash)[0]})"
            )
        elif doomed:
            vacuumed = len(table.vacuum(dry_run=False, **vacuum))
        for v in pinned:  # proof, not hope: each pinned version loads with all its files
            files = live_paths(uri, v, storage_options)
            if missing := files - _existing(uri, files, storage_options):
                raise TableError(f"Version {v} of {uri} lost files: {sorted(missing)[:3]}")
        return MaintenanceResult(
            uri=uri,
            version_before=before,
            version_after=open_table(uri, storage_options).version(),
            files_compacted=int(compact["numFilesRemoved"]),
            files_written=int(compact["numFilesAdded"]),
            checkpoint_version=checkpoint,
            files_vacuumed=vacuumed,
            vacuum_skipped=skipped,
            pinned_versions=pinned,
        )


def _existing(uri: str, paths: set[str], storage_options: Mapping[str, str] | None) -> set[str]:
    """Those of `paths` (relative to the table root) that storage still has."""
    fs = pafs.PyFileSystem(DeltaStorageHandler(uri, plain_options(storage_options)))
    infos = fs.get_file_info(sorted(paths))
    return {i.path for i in infos if i.type == pafs.FileType.File}
