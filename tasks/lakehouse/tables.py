"""Delta Lake tables of the lakehouse (delta-rs): create, commit exactly once, read.

Exactly once: every commit carries `Transaction(app_id, version)`; a writer commits version k
only when the table's transaction version for `app_id` is k-1. Two writers racing on one id:
delta-rs commits one and gives the other `CommitFailedError` ("Concurrent transaction failed").
A commit whose reply was lost raises the same error (delta-rs retries the PUT, finds the version
taken and checks it against itself), so each commit also records a writer token in its commit
info; after a conflict the writer looks for its token in the history before calling the commit
someone else's. No data file is deleted after a conflict: unreferenced files are `vacuum`'s job.

Protocol reader 1 / writer 2 (no deletion vectors, no column mapping), so the live file list of
a version is exactly its rows and any Delta or parquet reader sees what is committed. Logs are
kept for ten years and no commit made here deletes expired logs, so pinned versions stay
loadable. Plain module (no Prefect): Spark workers and training ranks import it. Processes that
use it must start by spawn, not fork (delta-rs' tokio runtime panics in a forked child).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import (
    CommitProperties,
    DeltaTable,
    PostCommitHookProperties,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction

from tasks.lakehouse.delta_access import TableError, delta_errors, plain_options, secret_values
from tasks.lakehouse.table_schema import (
    check_protocol,
    conform_schema,
    delta_types,
    storable_type,
)

TABLE_PROPERTIES = {
    "delta.logRetentionDuration": "interval 3650 days",
    "delta.deletedFileRetentionDuration": "interval 7 days",
    "delta.checkpointInterval": "50",
    "delta.appendOnly": "true",  # compaction still works: its removes have dataChange=false
}
TOKEN_KEY, APP_ID_KEY, APP_VERSION_KEY = "lakehouse.writer", "lakehouse.app_id", "lakehouse.app_v"
OWN_COMMIT_LOOKBACK = 50  # commits searched for our token when a retry finds its id done
# delta-rs writes snappy only when given no WriterProperties at all; any WriterProperties
# without a compression writes UNCOMPRESSED files (3-4x the bytes on disk and over the wire).
COMPRESSION = "SNAPPY"
COMMIT_ATTEMPTS = 3  # conflicts that are not about our app id (a concurrent schema merge)
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.=+-]+(/[A-Za-z0-9_.=+-]+)*$")
_NO_LOG_CLEANUP = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


@dataclass(frozen=True)
class CommitOutcome:
    """What an exactly-once commit did.

    Attributes:
        committed: True when this writer's commit holds the batch (also found after a lost
            reply); False when the id was already committed, by another writer or an earlier run.
        table_version: the version holding our commit, or the version seen when it was skipped.
        reason: one line for logs and reports.
    """

    committed: bool
    table_version: int | None
    reason: str


@dataclass(frozen=True)
class AddedFile:
    """A parquet file written into the table folder by another process (a Spark task).

    Attributes:
        path: relative to the table root, e.g. `part-00003-<attempt>.parquet` or `lang=fr/...`.
        size: bytes, as the writer saw them (checked against storage before committing).
        rows: rows, as the writer counted them (checked against the parquet footer).
        partition_values: one value per partition column of the table.
    """

    path: str
    size: int
    rows: int
    partition_values: Mapping[str, str | None] = field(default_factory=dict)


# -- tables -----------------------------------------------------------------------------------
def ensure_table(
    uri: str,
    *,
    schema: pa.Schema,
    storage_options: Mapping[str, str] | None = None,
    partition_by: list[str] | None = None,
    schema_mode: Literal["merge"] | None = None,
) -> None:
    """Create the table if absent (retention and protocol set); else check it fits `schema`.

    Args:
        uri: table location: a local folder or az://container/path.
        schema: the columns the writers will commit.
        storage_options: from `delta_storage_options`.
        partition_by: partition columns, for a new table.
        schema_mode: "merge" where writers may add nullable columns (bronze): the table may
            then lack some of `schema`'s columns or have more.

    Raises:
        TableError: the folder holds something else than a Delta table, needs a newer protocol,
            or has another type (or, without merge, another set) of columns.
    """
    with delta_errors(uri, storage_options):
        table = load_table(uri, storage_options)
        if table is None:
            refuse_non_delta(uri, storage_options)
            _create(uri, schema, partition_by, storage_options)
            return
        current = pa.schema(table.schema().to_arrow())
        conform_schema(current, schema, merge=True, what=f"Table {uri}")
        differ = sorted(set(current.names) ^ set(schema.names))
        if differ and not schema_mode:
            raise TableError(
                f"Table {uri} has other columns than this pipeline writes "
                f"(differing: {differ}): it was made by another version. Run "
                "`make clean` or use another lakehouse.root."
            )
        if partition_by is not None and table.metadata().partition_columns != partition_by:
            raise TableError(
                f"Table {uri} is partitioned by "
                f"{table.metadata().partition_columns}, not {partition_by}."
            )


def latest_version(uri: str, *, storage_options: Mapping[str, str] | None = None) -> int | None:
    """The table's latest version; None when there is no table yet."""
    with delta_errors(uri, storage_options):
        table = load_table(uri, storage_options)
        return None if table is None else table.version()


def transaction_version(
    uri: str, app_id: str, *, storage_options: Mapping[str, str] | None = None
) -> int:
    """How many commits of `app_id` the table holds (its transaction version); 0 if none."""
    with delta_errors(uri, storage_options):
        table = load_table(uri, storage_options)
        return 0 if table is None else table.transaction_version(app_id) or 0


def append_batch(
    uri: str,
    data: pa.Table | pa.RecordBatchReader,
    *,
    app_id: str,
    version: int,
    writer_token: str,
    metadata: Mapping[str, str],
    storage_options: Mapping[str, str] | None = None,
    schema_mode: Literal["merge"] | None = None,
    row_group_rows: int | None = None,
) -> CommitOutcome:
    """Append rows as commit `version` of `app_id`, exactly once (the table must exist).

    Args:
        uri: table location.
        data: the rows; a reader is consumed once (a conflict not about `app_id` then raises a
            retryable TableError instead of writing again).
        app_id: the unit's identity or the batch key.
        version: this id's commit number: 1, or k for the k-th chunk of a unit.
        writer_token: unique per writer (run and attempt); recorded in the commit info.
        metadata: lineage for the commit info (source identity, rows, flow run, parameters).
        storage_options: from `delta_storage_options`.
        schema_mode: "merge" lets new nullable columns in (bronze); a changed type is refused.
        row_group_rows: rows per parquet row group. The writer holds a row group in memory
            until it is full (delta-rs' default is a million rows), so this bounds the memory
            of a streamed commit.

    Returns:
        The outcome; committed=False means the id was already committed (the rows are there).

    Raises:
        TableError: no table, incompatible rows (the message names the column), or a
            retryable conflict.
        ValueError: commit `version` - 1 of `app_id` is not in the table yet.
    """
    props = _commit_properties(app_id, version, writer_token, metadata, storage_options)
    ours = {"storage_options": storage_options, "app_id": app_id, "version": version}
    ours["token"] = writer_token
    with delta_errors(uri, storage_options):
        for _ in range(COMMIT_ATTEMPTS):
            table = open_table(uri, storage_options)
            if outcome := _gate(table, app_id, version, writer_token):
                return outcome
            read_version = table.version()
            current = pa.schema(table.schema().to_arrow())
            target = conform_schema(current, data.schema, merge=schema_mode == "merge", what=uri)
            rows = data.cast(target) if target != data.schema else data
            try:
                write_deltalake(
                    table,
                    rows,
                    mode="append",
                    schema_mode=schema_mode,
                    commit_properties=props,
                    post_commithook_properties=_NO_LOG_CLEANUP,
                    writer_properties=WriterProperties(
                        compression=COMPRESSION, max_row_group_size=row_group_rows
                    ),
                )
                return CommitOutcome(True, table.version(), "committed")
            except CommitFailedError:
                if outcome := _after_conflict(uri, read_version=read_version, **ours):
                    return outcome
                if isinstance(data, pa.RecordBatchReader):
                    break
    raise TableError(
        f"Commit {version} of {app_id} to {uri} kept conflicting with other "
        "writers' commits; the task will retry.",
        retryable=True,
    )


def commit_files(
    uri: str,
    adds: list[AddedFile],
    *,
    schema: pa.Schema,
    app_id: str,
    version: int,
    writer_token: str,
    metadata: Mapping[str, str],
    storage_options: Mapping[str, str] | None = None,
    partition_by: list[str] | None = None,
) -> CommitOutcome:
    """Commit parquet files that other processes wrote into the table folder, exactly once.

    Each file must exist with the reported size and rows, and its columns must have the table's
    types; the table is created with `schema` if absent. Arguments as in `append_batch`.

    Raises:
        TableError: a file is missing, partial, outside the table or of another schema.
    """
    props = _commit_properties(app_id, version, writer_token, metadata, storage_options)
    ours = {"storage_options": storage_options, "app_id": app_id, "version": version}
    ours["token"] = writer_token
    with delta_errors(uri, storage_options):
        table = load_table(uri, storage_options)
        if table is None:  # no emptiness check: the files there are the ones being committed
            _create(uri, schema, partition_by, storage_options)
            table = open_table(uri, storage_options)
        if outcome := _gate(table, app_id, version, writer_token):
            return outcome
        actions = _add_actions(uri, table, adds, storage_options)
        read_version = table.version()
        try:
            table.create_write_transaction(
                actions,
                mode="append",
                schema=table.schema(),
                partition_by=table.metadata().partition_columns or None,
                commit_properties=props,
                post_commithook_properties=_NO_LOG_CLEANUP,
            )
        except CommitFailedError:
            outcome = _after_conflict(uri, read_version=read_version, **ours)
            if outcome:
                return outcome
            raise TableError(
                f"Commit {version} of {app_id} to {uri} conflicted with another "
                "writer's change of the table; the task will retry.",
                retryable=True,
            ) from None
        # create_write_transaction does not report the version it committed: find it.
        latest = open_table(uri, storage_options)
        own = _find_own_commit(
            latest, app_id, version, writer_token, latest.version() - read_version
        )
        return CommitOutcome(True, own, "committed")


def read_table(
    uri: str,
    *,
    version: int | None = None,
    columns: list[str] | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    """The rows of `version` (default: latest) of the table."""
    with delta_errors(uri, storage_options):
        return open_table(uri, storage_options, version).to_pyarrow_table(columns=columns)


def table_files(
    uri: str, *, version: int, storage_options: Mapping[str, str] | None = None
) -> list[str]:
    """Absolute URIs of the live parquet files of `version` (for Spark to read as parquet).

    Partition columns are in the folder names (`col=value/`), not inside the files.
    """
    with delta_errors(uri, storage_options):
        return open_table(uri, storage_options, version).file_uris()


# -- exactly once -----------------------------------------------------------------------------
def _commit_properties(
    app_id: str,
    version: int,
    token: str,
    metadata: Mapping[str, str],
    storage_options: Mapping[str, str] | None,
) -> CommitProperties:
    if version < 1:
        raise ValueError(f"Commit versions of {app_id} start at 1, not {version}.")
    secrets = secret_values(storage_options)
    for key, value in metadata.items():
        if any(s in str(value) for s in secrets):
            raise ValueError(f"Commit metadata {key!r} holds a credential: leave it out.")
    # Top-level keys for readers of the history (delta-rs, this project); `userMetadata` is
    # what Spark's DESCRIBE HISTORY shows.
    info = {
        **{k: str(v) for k, v in metadata.items()},
        "userMetadata": json.dumps(dict(metadata), sort_keys=True, default=str),
        TOKEN_KEY: token,
        APP_ID_KEY: app_id,
        APP_VERSION_KEY: str(version),
    }
    return CommitProperties(
        custom_metadata=info, app_transactions=[Transaction(app_id=app_id, version=version)]
    )


def _gate(table: DeltaTable, app_id: str, version: int, token: str) -> CommitOutcome | None:
    """An outcome when commit `version` of `app_id` is already in; None when it may go ahead."""
    done = table.transaction_version(app_id) or 0
    if done >= version:
        own = _find_own_commit(table, app_id, version, token, OWN_COMMIT_LOOKBACK)
        if own is not None:
            return CommitOutcome(True, own, "committed earlier by this writer")
        return CommitOutcome(False, table.version(), f"already committed ({app_id} at {done})")
    if done < version - 1:
        raise ValueError(
            f"Commit {version} of {app_id} must follow commit {version - 1}; "
            f"the table holds {done}."
        )
    return None


def _after_conflict(
    uri: str,
    *,
    storage_options: Mapping[str, str] | None,
    app_id: str,
    version: int,
    token: str,
    read_version: int,
) -> CommitOutcome | None:
    """After CommitFailedError: whose commit holds `app_id` now? None if nobody's (retry)."""
    table = open_table(uri, storage_options)
    if (table.transaction_version(app_id) or 0) < version:
        return None
    own = _find_own_commit(table, app_id, version, token, table.version() - read_version)
    if own is not None:
        return CommitOutcome(True, own, "committed (the reply was lost; found by writer token)")
    return CommitOutcome(False, table.version(), "committed by another writer")


def _find_own_commit(
    table: DeltaTable, app_id: str, version: int, token: str, lookback: int
) -> int | None:
    """The version of our commit of (`app_id`, `version`) among the last `lookback` commits."""
    ours = (token, app_id, str(version))
    for info in table.history(max(1, lookback)):
        if (info.get(TOKEN_KEY), info.get(APP_ID_KEY), info.get(APP_VERSION_KEY)) == ours:
            return int(info["version"])
    return None


# -- files, schemas, protocol -----------------------------------------------------------------
def _add_actions(
    uri: str, table: DeltaTable, adds: list[AddedFile], storage_options: Mapping[str, str] | None
) -> list[AddAction]:
    """Check each reported file against storage and its footer; AddActions for the good ones."""
    if not adds:
        raise ValueError(f"No files to commit to {uri}.")
    parts = table.metadata().partition_columns
    current = pa.schema(table.schema().to_arrow())
    data_cols = pa.schema([f for f in current if f.name not in parts])
    fs = pafs.PyFileSystem(DeltaStorageHandler(uri, plain_options(storage_options)))
    for add in adds:
        if not _SAFE_PATH.match(add.path) or ".." in add.path.split("/") or add.path[0] in "_.":
            raise TableError(f"{add.path!r} is not a data file path inside table {uri}.")
        if set(add.partition_values) != set(parts):
            raise TableError(
                f"{add.path} gives partition values for "
                f"{sorted(add.partition_values)}; table {uri} has {parts}."
            )
    infos = fs.get_file_info([a.path for a in adds])
    actions, now = [], int(time.time() * 1000)
    for add, info in zip(adds, infos, strict=True):
        if info.type != pafs.FileType.File or info.size != add.size:
            found = "missing" if info.type != pafs.FileType.File else f"{info.size} bytes"
            raise TableError(
                f"{uri}/{add.path}: reported {add.size} bytes, storage has {found}; "
                "a partial or lost part is never committed, rerun the batch."
            )
        with fs.open_input_file(add.path) as fh:
            footer = pq.ParquetFile(fh)
            rows, file_schema = footer.metadata.num_rows, footer.schema_arrow
        if rows != add.rows:
            raise TableError(f"{uri}/{add.path}: reported {add.rows} rows, the file has {rows}.")
        conform_schema(data_cols, file_schema, merge=False, what=f"{uri}/{add.path}", exact=True)
        mtime = int(info.mtime.timestamp() * 1000) if info.mtime else now
        actions.append(
            AddAction(
                path=add.path,
                size=add.size,
                modification_time=mtime,
                partition_values=dict(add.partition_values),
                data_change=True,
                stats=json.dumps({"numRecords": rows}),
            )
        )
    return actions


# -- loading and storage ----------------------------------------------------------------------
def load_table(
    uri: str, storage_options: Mapping[str, str] | None, version: int | None = None
) -> DeltaTable | None:
    if version is not None and version < 0:
        raise ValueError(f"Table versions start at 0, not {version}.")
    try:
        table = DeltaTable(uri, version=version, storage_options=plain_options(storage_options))
    except (TableNotFoundError, DeltaError) as exc:
        latest = None if version is None else load_table(uri, storage_options)
        if latest is not None:
            raise TableError(
                f"Version {version} of table {uri} cannot be loaded: the table has versions "
                f"up to {latest.version()}, and older ones stay only while their log is kept."
            ) from None
        if isinstance(exc, TableNotFoundError):
            return None
        raise
    check_protocol(table, uri)
    return table


def open_table(
    uri: str, storage_options: Mapping[str, str] | None, version: int | None = None
) -> DeltaTable:
    """The table at `uri` (at `version`); TableError when there is none."""
    table = load_table(uri, storage_options, version)
    if table is None:
        raise TableError(f"No Delta table at {uri}: nothing was committed there yet.")
    return table


def live_paths(uri: str, version: int, storage_options: Mapping[str, str] | None) -> set[str]:
    """Relative paths of the data files of `version` (it must load)."""
    table = open_table(uri, storage_options, version)
    return {unquote(p) for p in pa.table(table.get_add_actions()).column("path").to_pylist()}


def _create(
    uri: str,
    schema: pa.Schema,
    partition_by: list[str] | None,
    storage_options: Mapping[str, str] | None,
) -> None:
    schema = pa.schema([f.with_type(storable_type(f.type, table=True)) for f in schema])
    delta_types(schema, f"Table {uri}")  # a column Delta cannot store, named
    # "ignore": of writers racing to create it, one writes version 0 and the others load it.
    DeltaTable.create(
        uri,
        schema,
        mode="ignore",
        partition_by=partition_by,
        configuration=TABLE_PROPERTIES,
        storage_options=plain_options(storage_options),
    )


def refuse_non_delta(uri: str, storage_options: Mapping[str, str] | None) -> None:
    """Raise when `uri` holds files but no Delta table (the old manifest layout, say).

    Local folders only: the old layout never ran on Azure, and listing a remote prefix through
    delta-rs' filesystem holds the GIL during network I/O (it stalls other threads).
    """
    if "://" in uri:
        return
    names = set(os.listdir(uri)) if os.path.isdir(uri) else set()
    if names - {"_delta_log"}:
        raise TableError(
            f"{uri} holds files but no Delta table ({sorted(names)[:3]} ...): "
            "probably the lakehouse layout of an older version. Run `make clean` "
            "(or move the folder away) and run the pipeline again."
        )
