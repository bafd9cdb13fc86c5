"""Delta Lake tables through delta-rs: exactly-once appends by application transaction.

Every commit of a batch carries `Transaction(app_id=<batch key>, version=k)`. A writer commits
version k only when the table's transaction version for that id is k-1; a re-run or retry sees
the id done and skips. Two writers racing on one id: delta-rs lets one commit and gives the other
a concurrent-transaction conflict. A commit whose reply was lost looks the same to its writer, so
each commit records a writer token: after a conflict the writer looks for its own token in the
history before calling the batch someone else's. Data files are never deleted after a conflict
(the commit may be ours); files that no commit references are only removed by `vacuum`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from tasks.errors import UserError

log = logging.getLogger(__name__)

BATCH_META = "lakehouse.batch_id"
WRITER_META = "lakehouse.writer"
# Every version a registered model pins must stay loadable: keep the log (and the files it
# references) for ten years unless `maintain` is told otherwise; no deletion vectors or column
# mapping, so the protocol stays at reader 1 / writer 2 and every Delta reader can read it.
TABLE_PROPERTIES = {
    "delta.logRetentionDuration": "interval 3650 days",
    "delta.deletedFileRetentionDuration": "interval 7 days",
}
HISTORY_LOOKBACK = 200  # commits searched for our own writer token after a conflict
SUPPORTED_READER = 1


class TableError(UserError, ValueError):
    """A table path holds something this reader cannot use; the message says what to do."""


@dataclass(frozen=True)
class CommitOutcome:
    """The result of one exactly-once append."""

    committed: bool  # True: this writer's commit holds the batch (also after a lost reply)
    table_version: int | None
    reason: str


def open_table(uri: str, *, storage_options: dict[str, str], version: int | None = None) -> Any:
    """The Delta table at `uri` (at `version`), None when nothing is there yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(uri, version=version, storage_options=storage_options or None)
    except TableNotFoundError:
        _refuse_non_delta(uri, storage_options)
        return None
    except Exception as exc:
        storage = _storage_error(exc, uri)
        if storage is None:
            raise
        raise storage from exc
    protocol = table.protocol()
    if protocol.min_reader_version > 3 or (
        protocol.reader_features and set(protocol.reader_features) - {"timestampNtz"}
    ):
        raise TableError(
            f"{uri}: the Delta table needs reader version {protocol.min_reader_version} "
            f"(features {protocol.reader_features}); this pipeline reads version 1 tables. "
            "Write it without deletion vectors or column mapping, or point elsewhere."
        )
    return table


def _refuse_non_delta(uri: str, storage_options: dict[str, str]) -> None:
    """A folder with files but no `_delta_log` is not a table to create over."""
    if "://" in uri:
        return  # an empty Azure prefix is the common case; old layouts were local only
    from pathlib import Path

    p = Path(uri)
    if p.is_dir() and any(p.iterdir()) and not (p / "_delta_log").exists():
        raise TableError(
            f"{uri}: exists but is not a Delta table (no _delta_log; an older layout of this "
            "lakehouse?). Nothing was written. Run `make clean` to remove the old local "
            "lakehouse, or choose another lakehouse.root."
        )


def transaction_version(uri: str, app_id: str, *, storage_options: dict[str, str]) -> int:
    """Commits recorded for `app_id` so far (0 when none or no table)."""
    table = open_table(uri, storage_options=storage_options)
    if table is None:
        return 0
    return int(table.transaction_version(app_id) or 0)


def count_rows(uri: str, *, column: str, value: str, storage_options: dict[str, str]) -> int:
    """Rows whose `column` equals `value` in the latest version."""
    table = open_table(uri, storage_options=storage_options)
    if table is None:
        return 0
    return table.to_pyarrow_dataset().count_rows(filter=pads.field(column) == value)


def append_batch(
    uri: str,
    data: pa.Table | pa.RecordBatchReader,
    *,
    app_id: str,
    version: int,
    metadata: dict[str, str],
    storage_options: dict[str, str],
    schema_mode: str | None = None,
    where: str | None = None,
) -> CommitOutcome:
    """Append `data` as commit `version` of `app_id`, exactly once (see the module doc).

    Args:
        uri: the table (a local path or az://container/path); created on first append.
        data: the rows (a reader streams them: memory stays bounded).
        app_id: the batch key; version: which commit of it this is (1 for a whole unit).
        metadata: commit metadata (never identity: that is the app transaction).
        schema_mode: "merge" lets new nullable columns in (bronze); None keeps the schema.
        where: what the user called it, for error messages.
    """
    from deltalake import CommitProperties, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError

    table = open_table(uri, storage_options=storage_options)
    done = int(table.transaction_version(app_id) or 0) if table is not None else 0
    if table is not None:
        check_schema(table, data.schema, where or uri, merge=schema_mode == "merge")
    if done >= version:
        return CommitOutcome(False, None, "already committed")
    if done != version - 1:
        raise TableError(
            f"{uri}: commit {version} of {app_id} needs commit {version - 1} first "
            f"(the table has {done}); re-run to continue from there."
        )
    token = uuid.uuid4().hex
    props = CommitProperties(
        app_transactions=[Transaction(app_id=app_id, version=version)],
        custom_metadata={**metadata, WRITER_META: token},
        max_commit_retries=0,
    )
    try:
        write_deltalake(
            uri,
            data,
            mode="append",
            schema_mode=schema_mode,
            configuration=TABLE_PROPERTIES,
            storage_options=storage_options or None,
            commit_properties=props,
        )
    except SchemaMismatchError as exc:
        raise TableError(_schema_message(uri, where, exc)) from None
    except (CommitFailedError, DeltaError, OSError) as exc:
        if _is_schema_error(exc):
            raise TableError(_schema_message(uri, where, exc)) from None
        if not _is_conflict(exc):
            storage = _storage_error(exc, uri)
            if storage is None:
                raise
            raise storage from exc
        # Our commit may have landed and only its reply been lost: look for our token.
        own = _committed_by(uri, token, storage_options)
        if own is not None:
            return CommitOutcome(True, own, "committed (the reply was lost; found our commit)")
        if transaction_version(uri, app_id, storage_options=storage_options) >= version:
            return CommitOutcome(False, None, "committed by another writer")
        raise
    table = open_table(uri, storage_options=storage_options)
    own = _committed_by(uri, token, storage_options, table=table)
    return CommitOutcome(True, own, "committed")


def arrow_schema(table: Any) -> pa.Schema:
    """A Delta table's schema as Arrow."""
    schema = table.schema()
    return pa.schema(schema.to_arrow() if hasattr(schema, "to_arrow") else schema.to_pyarrow())


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    def norm(t: pa.DataType) -> str:
        s = str(t)
        for old, new in (("large_string", "string"), ("string_view", "string"), ("large_", "")):
            s = s.replace(old, new)
        return s.replace("item", "element").replace("<element: ", "<").replace("element: ", "")

    return norm(a) == norm(b) or (pa.types.is_timestamp(a) and pa.types.is_timestamp(b))


def check_schema(table: Any, incoming: pa.Schema, where: str, *, merge: bool) -> None:
    """Refuse rows whose columns change type (or, without merge, add columns)."""
    current = arrow_schema(table)
    for field in incoming:
        if field.name not in current.names:
            if not merge:
                raise TableError(
                    f"{where}: column {field.name!r} is not in the table's fixed schema "
                    f"{current.names}. Write it to a new table."
                )
            continue
        have = current.field(field.name).type
        if not _same_type(have, field.type) and not pa.types.is_null(field.type):
            raise TableError(
                f"{where}: column {field.name!r} is {field.type} but the table has it as "
                f"{have}. Nothing was written. Convert the column back to {have} in the "
                "source, or ingest it under another dataset name (a new table)."
            )


def _storage_error(exc: Exception, uri: str) -> Exception | None:
    """A remote table's credential, container or network fault as the lakehouse's StorageError
    (the message says what to fix; credentials are not retried), else None."""
    if "://" not in uri:
        return None
    from tasks.lakehouse.storage import StorageError, translate_storage_error

    out = translate_storage_error(exc, uri)
    if isinstance(out, StorageError) and not str(out).startswith("Storage error at"):
        return out
    return None


def _is_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "concurrent" in text or "conflict" in text or "version already exists" in text


def _is_schema_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "schema" in text and ("mismatch" in text or "cast" in text or "merge" in text)


def _schema_message(uri: str, where: str | None, exc: Exception) -> str:
    first = str(exc).splitlines()[0][:300]
    return (
        f"{where or uri}: the rows do not fit the table's schema ({first}). A column changed "
        "type: convert it back in the source, or write to a new table (another dataset name)."
    )


def _committed_by(
    uri: str, token: str, storage_options: dict[str, str], table: Any = None
) -> int | None:
    table = table or open_table(uri, storage_options=storage_options)
    if table is None:
        return None
    for entry in table.history(HISTORY_LOOKBACK):
        if entry.get(WRITER_META) == token:
            return int(entry["version"])
    return None


def read_version(
    uri: str,
    *,
    storage_options: dict[str, str],
    version: int | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The rows of one table version (all columns, or `columns`)."""
    table = open_table(uri, storage_options=storage_options, version=version)
    if table is None:
        return pa.table({})
    return table.to_pyarrow_dataset().to_table(columns=columns)


def live_files(
    uri: str, *, storage_options: dict[str, str], version: int | None = None
) -> list[str]:
    """Absolute URIs of the data files of one version (what Spark reads as plain parquet)."""
    table = open_table(uri, storage_options=storage_options, version=version)
    return [] if table is None else list(table.file_uris())


def latest_version(uri: str, *, storage_options: dict[str, str]) -> int | None:
    """The table's current version, None when there is no table."""
    table = open_table(uri, storage_options=storage_options)
    return None if table is None else int(table.version())
