"""Bronze ingest: one unit streamed through `datasets` into the bronze Delta table, one commit
per unit, or per chunk when the row budget (`source.max_rows`) cuts it (tasks.bronze.progress).

Rows keep the source's columns as they are, plus lineage (`_row_id`, `_batch_id`,
`_source_file`, `_source_version`, `_ingested_at`). Memory stays bounded: Arrow blocks flow from
`load_dataset(..., streaming=True)` through a RecordBatchReader into delta-rs. A later chunk
of a parquet unit starts at the row group holding its first row; json, csv and text skip the
rows already ingested while streaming.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import errno
import io
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as paj

from tasks.bronze.progress import (
    CHUNK_BUDGET_KEY,
    CHUNK_OFFSET_KEY,
    UnitProgress,
    chunk_batch_id,
    unit_progress,
)
from tasks.bronze.sources import SourceError, SourceUnit, batch_id_for
from tasks.lakehouse.delta import BATCH_META, append_batch, arrow_schema, count_rows, open_table
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import Lakehouse, StorageError
from tasks.params import SourceParams
from tasks.report import warn_in_run

log = logging.getLogger(__name__)

LINEAGE_COLUMNS = ["_row_id", "_batch_id", "_source_file", "_source_version", "_ingested_at"]
# `load_dataset_builder` (data file resolution) is not thread-safe: its tqdm thread_map
# deletes a shared class lock (AttributeError: type object 'tqdm' has no attribute '_lock')
# when units run at once in threads. It is short; the builder's first look at the data (the
# json builder parses its first 10 MB twice to infer features) and the streaming run in parallel.
_LOAD_LOCK = threading.Lock()
BATCH_ROWS = 10_000  # rows per Arrow block streamed into the Delta writer (bounded memory)
# Full disk, file size limit (RLIMIT_FSIZE), quota: the same fix for the user.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _stage_local(unit: SourceUnit, lake: Lakehouse | None, work: Path) -> Path:
    """A local, UTF-8-clean copy of the unit's file (or the file itself when already fine)."""
    if unit.uri.startswith("az://"):
        assert lake is not None
        local = work / Path(unit.uri).name
        lake.fs.get_file(unit.uri.split("://", 1)[1], str(local))
    else:
        local = Path(unit.uri)
    if unit.builder in {"json", "csv", "text"} and not _is_utf8(local):
        # Keep bad rows instead of failing the file: U+FFFD marks them, and silver quarantines
        # them with reason "bad_encoding" so they are counted, never silently lost.
        repaired = work / f"utf8-{local.name}"
        with open(local, "rb") as src, open(repaired, "w", encoding="utf-8") as dst:
            for line in src:
                dst.write(line.decode("utf-8", errors="replace"))
        warn_in_run(
            log,
            "%s is not valid UTF-8: bad bytes replaced by U+FFFD (rows kept; silver "
            "quarantines them as bad_encoding)",
            unit.uri,
        )
        return repaired
    return local


def _is_utf8(path: Path) -> bool:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


_TORCH_LOCK = threading.Lock()
_torch_hidden = 0  # units inside _torch_unseen now (they run at once in threads)


@contextlib.contextmanager
def _torch_unseen() -> Iterator[None]:
    """datasets' IterableDataset imports torch (1.5 s and a few hundred MB in a fresh process)
    only to share its epoch counter with torch DataLoader workers, which bronze never uses.
    Unless torch is loaded already, datasets sees it as absent while bronze builds its
    streaming datasets (counted: the flag comes back when the last unit is done with it)."""
    global _torch_hidden
    import datasets.config

    with _TORCH_LOCK:
        if _torch_hidden == 0 and ("torch" in sys.modules or not datasets.config.TORCH_AVAILABLE):
            hide = False
        else:
            hide = True
            _torch_hidden += 1
            datasets.config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        if hide:
            with _TORCH_LOCK:
                _torch_hidden -= 1
                if _torch_hidden == 0:
                    datasets.config.TORCH_AVAILABLE = True


JSON_CHUNK_BYTES = 10 << 20  # datasets' JsonConfig.chunksize: its features come from one chunk


def _flat_json_features(path: Path) -> Any:
    """The features datasets' json builder infers for this file, when Arrow alone can tell.

    Without `features` the builder reads the first chunk twice: once parsed by Arrow and once by
    ujson in Python (a search for objects with differing keys), which holds the GIL for about
    0.1 s per unit and, with units in threads, stalls the others. When the first chunk, read
    and parsed exactly as the builder does, has only flat columns (no list, struct or map),
    that search has nothing to find and the features are Arrow's schema of it: passed to the
    builder, they give the same rows and types without either pass. Anything else (nested
    columns, a JSON array file, an Arrow parse error) returns None: the builder infers itself.
    """
    import datasets

    try:
        with open(path, "rb") as fh:
            block = fh.read(JSON_CHUNK_BYTES)
            if block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]
            if not block.strip() or block.startswith(b"["):
                return None
            block += fh.readline()
        # The builder's block size: one block when the chunk is large (its segfault guard).
        block_size = max(JSON_CHUNK_BYTES // 32, 16 << 10)
        if len(block) // 8 > block_size:
            block_size = len(block)
        table = paj.read_json(
            io.BytesIO(block), read_options=paj.ReadOptions(block_size=block_size)
        )
    except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows == 0 or any(pa.types.is_nested(f.type) for f in table.schema):
        return None
    return datasets.Features.from_arrow_schema(table.schema)


def iter_unit_tables(
    unit: SourceUnit,
    split: str,
    name: str | None,
    token: str | None,
    staged: Path | None,
    batch_rows: int,
    start: int = 0,
) -> Iterator[pa.Table]:
    """Stream a unit as Arrow tables through `datasets.load_dataset` (flat memory), from row
    `start` on: parquet seeks to the row group holding it, other formats skip rows streaming."""
    import datasets

    try:
        if start and unit.builder == "parquet":
            yield from _parquet_from(unit, staged, token, start, batch_rows)
            return
        with _torch_unseen():
            if unit.builder == "hub":
                args: tuple[Any, ...] = (unit.hub_dataset, name)
                kwargs: dict[str, Any] = {"token": token}
            else:
                source = str(staged) if staged is not None else (unit.location or unit.uri)
                args, kwargs = (unit.builder,), {"data_files": {split: [source]}}
                if unit.builder == "json" and staged is not None:
                    kwargs["features"] = _flat_json_features(staged)
                if unit.hub_dataset:
                    kwargs["token"] = token
            # What load_dataset(..., streaming=True) does, with only the resolution locked.
            with _LOAD_LOCK:
                builder = datasets.load_dataset_builder(*args, **kwargs)
            ds = builder.as_streaming_dataset(split=split)
            if start:  # json, csv, text: no index to seek by, rows are read and dropped
                ds = ds.skip(start)
            ds = ds.with_format("arrow")
        for table in ds.iter(batch_size=batch_rows):
            yield table.replace_schema_metadata(None)
    except (StopIteration, RuntimeError) as exc:
        # The json builder peeks at the first block to infer features: an empty file ends that
        # peek with StopIteration (a RuntimeError once it crosses a generator).
        if not isinstance(exc, StopIteration) and not isinstance(
            exc.__cause__ or exc.__context__, StopIteration
        ):
            raise
        raise SourceError(f"{unit.uri}: empty source (no rows). Remove it or add rows.") from None
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(
            f"{unit.uri}: unreadable as {unit.builder} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Fix or remove the file, or set source.dataset "
            "to its real format."
        ) from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise SourceError(
            f"{unit.uri}: unreadable as {unit.builder} ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:200] if str(cause) else ''}). Fix or remove the file."
        ) from None


def _parquet_from(
    unit: SourceUnit, staged: Path | None, token: str | None, start: int, batch_rows: int
) -> Iterator[pa.Table]:
    """A parquet unit from row `start`: row groups before it are not read at all."""
    import pyarrow.parquet as pq

    if staged is not None:
        handle: Any = open(staged, "rb")
    else:  # a hub file (hf://...): fsspec's HfFileSystem reads only the byte ranges asked for
        import fsspec

        handle = fsspec.open(unit.location or unit.uri, "rb", token=token).open()
    with handle, pq.ParquetFile(handle) as pf:
        first, before = pf.metadata.num_row_groups, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if before + n > start:
                first = g
                break
            before += n
        skip = start - before
        groups = list(range(first, pf.metadata.num_row_groups))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip:
                batch, skip = batch.slice(skip), 0
            yield pa.Table.from_batches([batch]).replace_schema_metadata(None)


def _with_lineage(
    table: pa.Table,
    batch_id: str,
    unit: SourceUnit,
    start: int,
    ingested_at: dt.datetime,
    unit_id: str | None = None,
) -> pa.Table:
    """Lineage columns; row ids are `<unit batch id>-<index in the unit>` in every chunk."""
    n = table.num_rows
    prefix = unit_id or batch_id
    # Arrow compute, not a Python loop per row: units ingested at once share the GIL.
    index = pc.utf8_lpad(pc.cast(pa.arange(start, start + n), pa.string()), width=10, padding="0")
    row_ids = pc.binary_join_element_wise(pa.scalar(f"{prefix}-"), index, "")
    table = table.append_column("_row_id", row_ids)
    for name, value in (
        ("_batch_id", batch_id),
        ("_source_file", unit.uri),
        ("_source_version", unit.fingerprint),
    ):
        table = table.append_column(name, pa.repeat(pa.scalar(value, pa.string()), n))
    ts = pa.scalar(ingested_at, pa.timestamp("us", tz="UTC"))
    return table.append_column("_ingested_at", pa.repeat(ts, n))


@dataclass(frozen=True)
class UnitOutcome:
    """What bronze did with one unit (one chunk of it, when the row budget cuts it)."""

    batch_id: str  # the chunk's bronze batch (the unit's batch id for chunk 1)
    rows: int
    committed: bool  # False: this unit was committed before (a re-run, retry or racing run)
    table_version: int | None
    message: str
    uri: str = ""  # the unit
    chunk: int = 1  # the unit's app transaction version this commit holds
    offset: int = 0  # the unit's row index this chunk starts at
    partial: bool = False  # the chunk filled its budget: the unit goes on in a later run


def ingest_source_unit(
    lake: Lakehouse,
    unit: SourceUnit,
    *,
    source: SourceParams,
    dataset_key: str,
    language: str,
    token: str | None,
    max_rows: int | None,
    parameters: dict[str, Any],
    work_dir: Path,
    progress: UnitProgress | None = None,
) -> UnitOutcome:
    """Stream the next chunk of one unit into the bronze Delta table as one commit.

    The commit carries the application transaction (app id = the unit's batch id, version =
    chunks so far + 1) and starts at the unit's next row (`progress`, read from the table when
    not given). A complete unit is skipped; of two writers racing on a chunk only one commits;
    a stale `progress` (another run went on meanwhile) commits nothing (the gate refuses it).
    """
    rel = bronze_dir(dataset_key, language)
    uri = lake.table_uri(rel)
    unit_id = batch_id_for(dataset_key, language, unit)
    opts = lake.storage_options
    if progress is None:
        progress = unit_progress(lake, rel, [unit_id]).get(unit_id, UnitProgress())
    if progress.done:
        return UnitOutcome(unit_id, progress.rows, False, None, "already committed", uri=unit.uri)
    chunk, offset = progress.chunks + 1, progress.rows
    batch_id = chunk_batch_id(unit_id, chunk)
    ingested_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    work = Path(tempfile.mkdtemp(prefix=f"bronze-{unit_id}-", dir=work_dir))
    rows = 0
    try:
        staged = (
            None if unit.builder == "hub" or unit.hub_dataset else _stage_local(unit, lake, work)
        )
        tables = iter_unit_tables(
            unit, source.split, source.name, token, staged, batch_rows=BATCH_ROWS, start=offset
        )
        first = next(tables, None)
        if (first is None or first.num_rows == 0) and offset == 0:
            raise SourceError(f"{unit.uri}: empty source (no rows). Remove it or add rows.")
        if first is None:  # the last chunk ended exactly at its budget: close the unit
            first = _empty_like(uri, opts)
        for col, param in ((source.text_column, "text_column"), (source.target_column, None)):
            if col and first.num_columns and col not in first.column_names:
                raise SourceError(
                    f"{unit.uri}: no column {col!r} (source.{param or 'target_column'}); "
                    f"columns are {first.column_names}. Set source.{param or 'target_column'} "
                    "to the right column."
                )
        schema = _with_lineage(first.slice(0, 0), batch_id, unit, 0, ingested_at).schema

        def batches() -> Iterator[pa.RecordBatch]:
            nonlocal rows
            for table in itertools.chain([first], tables):
                if max_rows is not None and rows + table.num_rows > max_rows:
                    table = table.slice(0, max_rows - rows)
                if table.num_rows == 0:
                    return
                table = _with_lineage(table, batch_id, unit, offset + rows, ingested_at, unit_id)
                yield from _conform(table, schema, unit).to_batches()
                rows += table.num_rows
                if max_rows is not None and rows >= max_rows:
                    return

        outcome = append_batch(
            uri,
            pa.RecordBatchReader.from_batches(schema, batches()),
            app_id=unit_id,
            version=chunk,
            metadata={
                BATCH_META: batch_id,
                "lakehouse.source": unit.uri,
                "lakehouse.source_version": unit.fingerprint,
                CHUNK_BUDGET_KEY: "" if max_rows is None else str(max_rows),
                CHUNK_OFFSET_KEY: str(offset),
                **{f"lakehouse.param.{k}": str(v) for k, v in parameters.items()},
            },
            storage_options=opts,
            schema_mode="merge",
            where=f"{unit.uri} -> {lake.uri(rel)}",
            row_group_rows=source.rows_per_part,
        )
        if not outcome.committed:
            rows = count_rows(uri, column="_batch_id", value=batch_id, storage_options=opts)
        partial = max_rows is not None and rows >= max_rows
        return UnitOutcome(
            batch_id,
            rows,
            outcome.committed,
            outcome.table_version,
            outcome.reason,
            uri=unit.uri,
            chunk=chunk,
            offset=offset,
            partial=partial,
        )
    except Exception as exc:
        code = _no_space_errno(exc)
        if code is None:
            raise
        # Waiting will not free space: fail once, plainly, with nothing committed.
        raise StorageError(
            f"{unit.uri}: writing bronze batch {batch_id} failed: disk full / file size limit "
            f"({os.strerror(code)}). Free space in the work folder {work_dir} "
            "(LAKEHOUSE_WORK_DIR) and the lakehouse, or raise the limit, then re-run: nothing "
            "of this batch was committed.",
            retryable=False,
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _empty_like(uri: str, storage_options: dict[str, str] | None) -> pa.Table:
    """No rows, in the bronze table's source columns (the closing chunk of a unit)."""
    table = open_table(uri, storage_options=storage_options)
    schema = arrow_schema(table)
    keep = [f for f in schema if f.name not in LINEAGE_COLUMNS]
    return pa.schema(keep).empty_table()


def _no_space_errno(exc: BaseException) -> int | None:
    """The errno of a full disk / file size limit / quota, else None.

    Python raises OSError; delta-rs (object_store) raises DeltaError with the OS error only in
    its text ("... File too large (os error 27)").
    """
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in NO_SPACE_ERRNOS else None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(found.group(1)) if found else None
    return code if code in NO_SPACE_ERRNOS else None


def _conform(table: pa.Table, schema: pa.Schema, unit: SourceUnit) -> pa.Table:
    """Rows of a later block in the unit's first block's schema (a file has one schema)."""
    if table.schema.equals(schema):
        return table
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        changed = [
            f.name
            for f in schema
            if f.name in table.column_names and table.schema.field(f.name).type != f.type
        ]
        raise SourceError(
            f"{unit.uri}: column(s) {changed} change type inside the file; bronze keeps one "
            "type per column. Fix the file, or convert it to parquet with explicit types."
        ) from None


def default_work_dir() -> Path:
    d = Path(os.environ.get("LAKEHOUSE_WORK_DIR", ".work")) / "staging"
    d.mkdir(parents=True, exist_ok=True)
    return d
