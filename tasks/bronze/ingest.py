"""Bronze: ingest a source (hub dataset, json/parquet/csv/text files) into the lakehouse.

A source is split into units (one file, or one dataset shard); each unit becomes one bronze
batch whose id is derived from the unit's identity (path + size + content hash, or the hub
revision), so the same unit always maps to the same batch and is committed at most once.
"""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.errors import UserError
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import BATCH_META, append_batch, count_rows, transaction_version
from tasks.lakehouse.layout import bronze_dir, stable_id
from tasks.lakehouse.storage import Lakehouse, StorageError, iter_local_files, sha256_file
from tasks.params import SourceParams

log = logging.getLogger(__name__)

PACKAGED_BUILDERS = {"json", "parquet", "csv", "text", "arrow"}
EXTENSION_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
LINEAGE_COLUMNS = ["_row_id", "_batch_id", "_source_file", "_source_version", "_ingested_at"]
BATCH_ROWS = 10_000  # rows per Arrow block streamed into the Delta writer (bounded memory)
# Full disk, file size limit (RLIMIT_FSIZE), quota: the same fix for the user.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class SourceError(UserError, ValueError):
    """The source cannot be read as asked; the message names it and the fix."""


@dataclass(frozen=True)
class SourceUnit:
    """One ingestible unit: a file or a dataset shard, with its identity."""

    uri: str
    builder: str
    fingerprint: str
    size: int | None = None
    hub_dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_id_for(dataset_key: str, language: str, unit: SourceUnit) -> str:
    """The bronze batch id of a unit: same unit, same id."""
    return stable_id("bronze", dataset_key, language, unit.uri, unit.fingerprint)


# -- resolving the source into units ----------------------------------------------------------
def resolve_units(
    dataset: str,
    name: str | None,
    data_files: str | list[str] | None,
    split: str,
    revision: str | None,
    token: str | None,
    lake: Lakehouse | None = None,
) -> list[SourceUnit]:
    """List the units of a source, each with a content fingerprint."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    local_dataset = Path(dataset).expanduser()
    if dataset in PACKAGED_BUILDERS or local_dataset.exists():
        if local_dataset.exists() and dataset not in PACKAGED_BUILDERS:
            base = local_dataset
            patterns = [str(base / p) for p in patterns] if patterns else [str(base)]
        if not patterns:
            raise SourceError(
                f"source.dataset={dataset!r} needs source.data_files (a file, glob or folder)"
            )
        return _file_units(dataset, patterns, lake)
    return _hub_units(dataset, name, split, revision, token, patterns)


def _file_units(dataset: str, patterns: list[str], lake: Lakehouse | None) -> list[SourceUnit]:
    units: list[SourceUnit] = []
    for pattern in patterns:
        if pattern.startswith("az://"):
            if lake is None or lake.is_local:
                raise SourceError(
                    f"source.data_files={pattern!r} is on Azure but the lakehouse is local: "
                    "use an az:// lakehouse.root with its block, or a local path"
                )
            found = _azure_units(dataset, pattern, lake)
        else:
            found = [_local_unit(dataset, p) for p in iter_local_files(pattern)]
        if not found:
            raise SourceError(
                f"source.data_files={pattern!r} matches no file: check the path or glob "
                "(relative paths are resolved from the current folder)"
            )
        units.extend(found)
    return sorted({u.uri: u for u in units}.values(), key=lambda u: u.uri)


def _local_unit(dataset: str, path: Path) -> SourceUnit:
    try:
        return SourceUnit(
            uri=str(path.resolve()),
            builder=_builder_for(dataset, path.name),
            fingerprint=f"sha256:{sha256_file(path)}",
            size=path.stat().st_size,
        )
    except OSError as exc:
        raise SourceError(
            f"{path}: cannot be read ({exc.strerror or type(exc).__name__}). Fix its "
            "permissions or remove it from source.data_files."
        ) from None


def _azure_units(dataset: str, pattern: str, lake: Lakehouse) -> list[SourceUnit]:
    path = pattern.split("://", 1)[1]
    fs, call = lake.fs, lake._call  # _call turns SDK errors into StorageError
    lake._fresh()  # new landing files must be visible to a long-lived process
    if any(ch in path for ch in "*?["):
        paths = call(fs.glob, path)
    elif call(fs.isdir, path):
        paths = call(fs.find, path)
    else:
        paths = [path] if call(fs.exists, path) else []
    units = []
    for p in sorted(paths):
        info = call(fs.info, p)
        if info.get("type") == "directory":
            continue
        etag = (info.get("etag") or "").strip('"')
        md5 = (
            info.get("content_settings", {}).get("content_md5")
            if isinstance(info.get("content_settings"), dict)
            else None
        )
        units.append(
            SourceUnit(
                uri=f"az://{p}",
                builder=_builder_for(dataset, p.rsplit("/", 1)[-1]),
                fingerprint=f"etag:{etag}" if etag else f"md5:{md5}",
                size=info.get("size"),
            )
        )
    return units


def _builder_for(dataset: str, filename: str) -> str:
    if dataset in PACKAGED_BUILDERS:
        return dataset
    name = filename.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = Path(name).suffix
    if ext not in EXTENSION_BUILDERS:
        raise SourceError(
            f"{filename}: cannot tell its format from the extension {ext!r}; set "
            f"source.dataset to one of {sorted(PACKAGED_BUILDERS)}"
        )
    return EXTENSION_BUILDERS[ext]


def _hub_units(
    dataset: str,
    name: str | None,
    split: str,
    revision: str | None,
    token: str | None,
    patterns: list[str],
) -> list[SourceUnit]:
    """Units of a hub dataset: one per data file at a pinned revision, else one per split."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(
            dataset,
            name,
            revision=revision,
            token=token,
            data_files=patterns or None,
        )
    except Exception as exc:  # noqa: BLE001 - many error types; all mean the same to a user
        raise _hub_error(exc, dataset, name) from None
    files = []
    data_files = getattr(builder.config, "data_files", None) or {}
    if split not in data_files and data_files:
        raise SourceError(
            f"source.split={split!r} not in {dataset} ({name}); available: {sorted(data_files)}"
        )
    files = list(data_files.get(split, [])) if data_files else []
    builder_name = getattr(builder, "name", None) or "parquet"
    if files:
        # hf:// URLs resolved by `datasets` carry the commit sha, so the path is an identity.
        return [
            SourceUnit(
                uri=str(f), builder=builder_name, fingerprint=f"hub:{f}", hub_dataset=dataset
            )
            for f in files
        ]
    ident = f"hub:{dataset}:{name}:{split}:{revision or builder.hash}"
    return [
        SourceUnit(
            uri=f"hf://datasets/{dataset}/{name or ''}/{split}",
            builder="hub",
            fingerprint=ident,
            hub_dataset=dataset,
        )
    ]


def _hub_error(exc: Exception, dataset: str, name: str | None) -> SourceError:
    text = f"{type(exc).__name__}: {exc}"
    if "BuilderConfig" in text or "Config name" in text or "config" in text.lower() and name:
        return SourceError(
            f"source.name={name!r} is not a config of {dataset!r}: {str(exc).splitlines()[0]}. "
            "Set source.name to one of its configs (for CulturaX, a language code such as fr)."
        )
    if "gated" in text.lower() or "401" in text or "403" in text:
        return SourceError(
            f"{dataset} is gated: accept its terms on the Hub and save your token in the "
            "Prefect Secret block named by source.token_secret (`HF_TOKEN=... python -m "
            "blocks create`)."
        )
    if "offline" in text.lower() or "Connection" in text or "resolve" in text.lower():
        return SourceError(
            f"source.dataset={dataset!r}: not a local path, not one of "
            f"{sorted(PACKAGED_BUILDERS)}, and the Hugging Face Hub cannot be reached to look "
            f"it up ({type(exc).__name__}). Check the name, the path, or the network."
        )
    return SourceError(
        f"source.dataset={dataset!r} (config {name!r}) could not be loaded: "
        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


# -- reading one unit ---------------------------------------------------------------------
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
        _warn(
            "%s is not valid UTF-8: bad bytes replaced by U+FFFD (rows kept; silver "
            "quarantines them as bad_encoding)",
            unit.uri,
        )
        return repaired
    return local


def _warn(msg: str, *args: object) -> None:
    """Warn in the Prefect run's log when inside a run (visible in the UI), else plainly."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(msg, *args)
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        log.warning(msg, *args)


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


def iter_unit_tables(
    unit: SourceUnit,
    split: str,
    name: str | None,
    token: str | None,
    staged: Path | None,
    batch_rows: int,
) -> Iterator[pa.Table]:
    """Stream a unit as Arrow tables through `datasets.load_dataset` (flat memory)."""
    import datasets

    try:
        if unit.builder == "hub":
            ds = datasets.load_dataset(
                unit.hub_dataset, name, split=split, streaming=True, token=token
            )
        else:
            source = str(staged) if staged is not None else unit.uri
            kwargs: dict[str, Any] = {}
            if unit.hub_dataset:
                kwargs["token"] = token
            ds = datasets.load_dataset(
                unit.builder, data_files={split: [source]}, split=split, streaming=True, **kwargs
            )
        for table in ds.with_format("arrow").iter(batch_size=batch_rows):
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


def _with_lineage(
    table: pa.Table, batch_id: str, unit: SourceUnit, start: int, ingested_at: dt.datetime
) -> pa.Table:
    n = table.num_rows
    row_ids = pa.array([f"{batch_id}-{i:010d}" for i in range(start, start + n)], pa.string())
    table = table.append_column("_row_id", row_ids)
    table = table.append_column("_batch_id", pa.array([batch_id] * n, pa.string()))
    table = table.append_column("_source_file", pa.array([unit.uri] * n, pa.string()))
    table = table.append_column("_source_version", pa.array([unit.fingerprint] * n, pa.string()))
    ts = pa.array([ingested_at] * n, pa.timestamp("us", tz="UTC"))
    return table.append_column("_ingested_at", ts)


@dataclass(frozen=True)
class UnitOutcome:
    """What bronze did with one unit."""

    batch_id: str
    rows: int
    committed: bool  # False: this unit was committed before (a re-run, retry or racing run)
    table_version: int | None
    message: str


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
) -> UnitOutcome:
    """Stream one unit into the bronze Delta table as one commit (exactly once per unit).

    The commit carries the application transaction (app id = the unit's batch id, version 1):
    a unit already committed is skipped, and of two writers racing on it only one commits.
    """
    rel = bronze_dir(dataset_key, language)
    uri = lake.table_uri(rel)
    batch_id = batch_id_for(dataset_key, language, unit)
    opts = lake.storage_options
    if transaction_version(uri, batch_id, storage_options=opts) >= 1:
        rows = count_rows(uri, column="_batch_id", value=batch_id, storage_options=opts)
        return UnitOutcome(batch_id, rows, False, None, "already committed")
    ingested_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    work = Path(tempfile.mkdtemp(prefix=f"bronze-{batch_id}-", dir=work_dir))
    rows = 0
    try:
        staged = (
            None if unit.builder == "hub" or unit.hub_dataset else _stage_local(unit, lake, work)
        )
        tables = iter_unit_tables(
            unit, source.split, source.name, token, staged, batch_rows=BATCH_ROWS
        )
        first = next(tables, None)
        if first is None or first.num_rows == 0:
            raise SourceError(f"{unit.uri}: empty source (no rows). Remove it or add rows.")
        for col, param in ((source.text_column, "text_column"), (source.target_column, None)):
            if col and col not in first.column_names:
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
                table = _with_lineage(table, batch_id, unit, rows, ingested_at)
                yield from _conform(table, schema, unit).to_batches()
                rows += table.num_rows
                if max_rows is not None and rows >= max_rows:
                    return

        outcome = append_batch(
            uri,
            pa.RecordBatchReader.from_batches(schema, batches()),
            app_id=batch_id,
            version=1,
            metadata={
                BATCH_META: batch_id,
                "lakehouse.source": unit.uri,
                "lakehouse.source_version": unit.fingerprint,
                "lakehouse.truncated": str(bool(max_rows is not None and rows >= max_rows)),
                **{f"lakehouse.param.{k}": str(v) for k, v in parameters.items()},
            },
            storage_options=opts,
            schema_mode="merge",
            where=f"{unit.uri} -> {lake.uri(rel)}",
        )
        if not outcome.committed:
            rows = count_rows(uri, column="_batch_id", value=batch_id, storage_options=opts)
        return UnitOutcome(batch_id, rows, outcome.committed, outcome.table_version, outcome.reason)
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


@dataclass
class Plan:
    """What a bronze run will do."""

    todo: list[SourceUnit]
    skipped: list[str]
    changed: list[str]


def plan_units(lake: Lakehouse, dataset_key: str, language: str, units: list[SourceUnit]) -> Plan:
    """Split units into new ones, already ingested ones, and changed-after-ingestion ones."""
    by_uri: dict[str, set[str]] = {}
    for b in committed_batches(lake, bronze_dir(dataset_key, language)):
        for uri, fingerprint in b.sources:
            by_uri.setdefault(uri, set()).add(fingerprint)
    todo, skipped, changed = [], [], []
    for u in units:
        seen = by_uri.get(u.uri)
        if seen is None:
            todo.append(u)
        elif u.fingerprint in seen:
            skipped.append(u.uri)
        else:
            # Same path, different content: ingesting it again would duplicate rows under new
            # ids. Quarantine it for a person to decide (rename the file to ingest it anyway).
            changed.append(u.uri)
    return Plan(todo=todo, skipped=skipped, changed=changed)


def default_work_dir() -> Path:
    d = Path(os.environ.get("LAKEHOUSE_WORK_DIR", ".work")) / "staging"
    d.mkdir(parents=True, exist_ok=True)
    return d
