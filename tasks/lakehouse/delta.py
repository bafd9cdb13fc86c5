"""What the layers need from their Delta tables, in their terms: batches, not transactions.

tasks.lakehouse.tables holds the exactly-once machinery (application transactions, the writer
token that recognises a commit whose reply was lost, schema and protocol checks). This module
is the thin layer the bronze, silver and training code call: create-on-first-commit, reads of
one version, and the history's commit metadata.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from tasks.lakehouse.delta_access import delta_errors
from tasks.lakehouse.tables import (
    CommitOutcome,
    TableError,
    ensure_table,
    latest_version,
    load_table,
    refuse_non_delta,
    table_files,
    transaction_version,
)
from tasks.lakehouse.tables import append_batch as _append_rows

__all__ = [
    "BATCH_META",
    "CommitOutcome",
    "TableError",
    "append_batch",
    "arrow_schema",
    "count_rows",
    "latest_version",
    "live_files",
    "open_table",
    "read_version",
    "transaction_version",
]

BATCH_META = "lakehouse.batch_id"  # commit metadata: the batch a commit holds (for readers)


def open_table(
    uri: str, *, storage_options: Mapping[str, str] | None, version: int | None = None
) -> Any:
    """The Delta table at `uri` (at `version`); None when nothing was committed there yet.

    Raises:
        TableError: the folder holds something else (an older layout: run `make clean`), or a
            protocol this reader does not support.
    """
    with delta_errors(uri, storage_options):
        table = load_table(uri, storage_options, version)
        if table is None:
            refuse_non_delta(uri, storage_options)
        return table


def append_batch(
    uri: str,
    data: pa.Table | pa.RecordBatchReader,
    *,
    app_id: str,
    version: int,
    metadata: Mapping[str, str],
    storage_options: Mapping[str, str] | None,
    schema_mode: str | None = None,
    where: str | None = None,
    row_group_rows: int | None = None,
) -> CommitOutcome:
    """Commit `data` as commit `version` of `app_id`, exactly once; the table is created on the
    first commit. `where` (a source file, say) prefixes schema errors so they name the input;
    `row_group_rows` bounds the writer's memory (rows held before a row group is written)."""
    try:
        ensure_table(
            uri, schema=data.schema, storage_options=storage_options, schema_mode=schema_mode
        )
        return _append_rows(
            uri,
            data,
            app_id=app_id,
            version=version,
            writer_token=uuid.uuid4().hex,
            metadata=metadata,
            storage_options=storage_options,
            schema_mode=schema_mode,
            row_group_rows=row_group_rows,
        )
    except TableError as exc:
        if where and where not in str(exc):
            raise TableError(f"{where}: {exc}", retryable=exc.retryable) from None
        raise


def arrow_schema(table: Any) -> pa.Schema:
    """A Delta table's schema as Arrow."""
    return pa.schema(table.schema().to_arrow())


def count_rows(
    uri: str, *, column: str, value: str, storage_options: Mapping[str, str] | None
) -> int:
    """Rows whose `column` equals `value` in the latest version."""
    table = open_table(uri, storage_options=storage_options)
    if table is None:
        return 0
    with delta_errors(uri, storage_options):
        return table.to_pyarrow_dataset().count_rows(filter=pads.field(column) == value)


def read_version(
    uri: str,
    *,
    storage_options: Mapping[str, str] | None,
    version: int | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The rows of one table version (all columns, or `columns`); empty when no table."""
    table = open_table(uri, storage_options=storage_options, version=version)
    if table is None:
        return pa.table({})
    with delta_errors(uri, storage_options):
        return table.to_pyarrow_dataset().to_table(columns=columns)


def live_files(
    uri: str, *, storage_options: Mapping[str, str] | None, version: int | None = None
) -> list[str]:
    """Absolute URIs of the data files of one version (what Spark reads as plain parquet)."""
    if version is None:
        version = latest_version(uri, storage_options=storage_options)
        if version is None:
            return []
    return table_files(uri, version=version, storage_options=storage_options)
