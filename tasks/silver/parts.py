"""Silver and rejected part files, written by the Spark executors straight into the tables.

`write_parts` is the `mapInArrow` body of the silver job's last stage. Each partition arrives
sorted by (bronze batch, `_row_id`); the executor splits its rows into silver rows and rejected
rows and writes them as parquet parts into the two tables' folders (a path every worker sees, or
the Azure container through adlfs: tasks.silver.blob_io), then yields one small report row
per file: path, size, rows, first `_row_id` and reject counts.
The driver commits only what successful tasks report (tasks.silver.commit), so the files of a
failed, killed or speculative attempt are never in the Delta log. A part's name carries the
bronze batch, the partition and a fresh id per task attempt, so no attempt ever overwrites a
file another one wrote.

Plain module (pyarrow, fsspec): Spark's Python workers import it without the rest of the project.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.silver.blob_io import PartFile, filesystem, resolved

# Parquet's standard name for list items: what pyarrow and Spark read back.
TOKEN_IDS = pa.list_(pa.field("element", pa.int32()))
ROW_GROUP_ROWS = 10_000  # rows buffered before a row group is written (bounds executor memory)

REPORT_SCHEMA = pa.schema(
    [
        pa.field("bronze_batch_id", pa.string()),
        pa.field("kind", pa.string()),  # "silver" or "rejected"
        pa.field("path", pa.string()),  # relative to the table folder
        pa.field("size", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("first_row_id", pa.string()),
        pa.field("rejected", pa.string()),  # JSON {reason: count} (rejected parts)
    ]
)
REPORT_DDL = (
    "bronze_batch_id string, kind string, path string, size bigint, rows bigint, "
    "first_row_id string, rejected string"
)


def silver_schema(has_target: bool) -> pa.Schema:
    """Columns of a silver batch (DESIGN.md)."""
    fields = [
        pa.field("_row_id", pa.string()),
        pa.field("_batch_id", pa.string()),
        pa.field("_bronze_batch_id", pa.string()),
        pa.field("text", pa.string()),
    ]
    if has_target:
        fields.append(pa.field("target", pa.string()))
    fields.append(pa.field("input_ids", TOKEN_IDS))
    if has_target:
        fields.append(pa.field("labels", TOKEN_IDS))
    fields += [pa.field("num_tokens", pa.int32()), pa.field("_text_hash", pa.string())]
    return pa.schema(fields)


def rejected_schema(has_target: bool) -> pa.Schema:
    """Columns of a rejected batch: the row, why, and an excerpt of the original text."""
    fields = [
        pa.field("_row_id", pa.string()),
        pa.field("_batch_id", pa.string()),
        pa.field("_bronze_batch_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("text", pa.string()),
    ]
    if has_target:
        fields.append(pa.field("target", pa.string()))
    fields.append(pa.field("duplicate_of", pa.string()))
    return pa.schema(fields)


def conformed(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`; columns it lacks become nulls."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


class _Part:
    """One open part file of one table: rows are buffered into row groups, then closed."""

    def __init__(self, file: PartFile, name: str, schema: pa.Schema, bronze: str, kind: str):
        self.file, self.name, self.schema = file, name, schema
        self.bronze, self.kind = bronze, kind
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[pa.Table] = []
        self.buffered = self.rows = 0
        self.first: str | None = None
        self.reasons: Counter[str] = Counter()

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        if self.first is None:
            self.first = rows.column("_row_id")[0].as_py()
        if self.kind == "rejected":
            self.reasons.update(rows.column("reason").to_pylist())
        self.buffer.append(rows)
        self.buffered += rows.num_rows
        self.rows += rows.num_rows
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.file.scratch, self.schema, compression="snappy")
        self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=self.buffered)
        self.buffer, self.buffered = [], 0

    def close(self) -> dict | None:
        """The report row of the closed file (None when it got no rows)."""
        self._flush()
        if self.writer is None:
            self.file.discard()
            return None
        self.writer.close()
        return {
            "bronze_batch_id": self.bronze,
            "kind": self.kind,
            "path": self.name,
            "size": self.file.publish(),
            "rows": self.rows,
            "first_row_id": self.first,
            "rejected": json.dumps(dict(sorted(self.reasons.items()))),
        }


def _attempt() -> tuple[int, str]:
    """(partition id, a name unique to this task attempt)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:  # outside Spark (unit tests)
        ctx = None
    partition = ctx.partitionId() if ctx is not None else 0
    attempt = ctx.attemptNumber() if ctx is not None else 0
    return partition, f"a{attempt}-{uuid.uuid4().hex}"


def write_parts(
    batches: Iterable[pa.RecordBatch],
    *,
    silver_dir: str,
    rejected_dir: str,
    batch_ids: dict[str, str],
    has_target: bool,
    rows_per_part: int,
    access: object = None,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: write one partition's rows as silver and rejected parts; report them.

    Rows arrive sorted by (`_bronze_batch_id`, `_row_id`); a part holds rows of one bronze
    batch and at most `rows_per_part` rows. `batch_ids` maps a bronze batch id to its silver
    batch id (the `_batch_id` column of both tables). `access`: None for a local folder, else
    the tables' Azure access (tasks.silver.blob_io.BlobAccess, or a broadcast of it); the
    folders are then `container/path` names.
    """
    partition, attempt = _attempt()
    blob = resolved(access)
    fs = filesystem(blob)
    schemas = {"silver": silver_schema(has_target), "rejected": rejected_schema(has_target)}
    folders = {"silver": silver_dir, "rejected": rejected_dir}
    open_parts: dict[str, _Part] = {}
    current: str | None = None
    seq = 0
    reports: list[dict] = []

    def close_all() -> None:
        for part in open_parts.values():
            report = part.close()
            if report:
                reports.append(report)
        open_parts.clear()

    def part(kind: str, bronze: str) -> _Part:
        nonlocal seq
        p = open_parts.get(kind)
        if p is not None and p.rows >= rows_per_part:
            report = p.close()
            if report:
                reports.append(report)
            p = None
        if p is None:
            name = f"part-{bronze}-{partition:05d}-{seq:04d}-{attempt}.parquet"
            seq += 1
            file = PartFile(fs, folders[kind], name, local=blob is None)
            p = open_parts[kind] = _Part(file, name, schemas[kind], bronze, kind)
        return p

    for batch in batches:
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        bronze_col = table.column("_bronze_batch_id")
        # Split the (sorted) batch into runs of one bronze batch.
        for bronze in pc.unique(bronze_col).to_pylist():
            rows = table.filter(pc.equal(bronze_col, bronze))
            if bronze != current:
                close_all()
                current = bronze
            n = rows.num_rows
            rows = rows.drop_columns([c for c in ("_batch_id",) if c in rows.column_names])
            rows = rows.append_column("_batch_id", pa.array([batch_ids[bronze]] * n, pa.string()))
            rejected = pc.is_valid(rows.column("reason"))
            for kind, mask in (("silver", pc.invert(rejected)), ("rejected", rejected)):
                chosen = rows.filter(mask)
                start = 0
                while start < chosen.num_rows:
                    p = part(kind, bronze)
                    take = max(1, min(chosen.num_rows - start, rows_per_part - p.rows))
                    p.add(conformed(chosen.slice(start, take), schemas[kind]))
                    start += take
        if reports:
            yield pa.RecordBatch.from_pylist(reports, schema=REPORT_SCHEMA)
            reports.clear()
    close_all()
    if reports:
        yield pa.RecordBatch.from_pylist(reports, schema=REPORT_SCHEMA)
