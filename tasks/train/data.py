"""Silver for training: find the silver table, read one pinned version, hold out eval.

Training reads one pinned version of the silver Delta table: only the files that version's log
references, so leftovers of a crashed silver run never reach training, and the version is
recorded with the run. The evaluation split is chosen by a hash of `_row_id`: a row stays on
its side across runs and when new batches land.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.lakehouse.batches import Batch, committed_batches
from tasks.lakehouse.delta import BATCH_META, arrow_schema, open_table
from tasks.lakehouse.layout import silver_dir
from tasks.lakehouse.storage import Lakehouse

# The tokenizer identity (silver tables are keyed by it): one definition, tasks.silver.tokenize.
from tasks.silver.tokenize import tokenizer_fingerprint, tokenizer_key  # noqa: F401 - re-exported

TRAIN_COLUMNS = ["_row_id", "input_ids", "num_tokens"]
PAIR_COLUMNS = ["labels"]


class TrainingError(UserError, ValueError):
    """Training cannot start or go on; the message names the field or file and the fix."""


@dataclass(frozen=True)
class SilverSnapshot:
    """One pinned version of a silver table: what a training run reads and records."""

    table: str  # relative to the lakehouse root
    uri: str
    version: int
    rows: int
    batches: tuple[Batch, ...]
    columns: tuple[str, ...]
    files: tuple[str, ...]  # live data files of that version (absolute URIs)

    def lineage(self) -> list[dict]:
        """One record per committed silver batch (tracking's lineage tags and dataset input)."""
        return [
            {
                "batch_id": b.batch_id,
                "rows": b.rows,
                "parents": list(b.parents),
                "uri": self.uri,
                "table_version": self.version,
            }
            for b in self.batches
        ]


def find_silver(
    lake: Lakehouse,
    dataset_key: str,
    language: str,
    tok_key: str,
    model_name: str,
    fingerprint: str | None = None,
) -> SilverSnapshot:
    """The latest version of this tokenizer's silver table, or a TrainingError saying why not."""
    table = silver_dir(dataset_key, language, tok_key)
    opts = lake.storage_options
    delta = open_table(lake.table_uri(table), storage_options=opts)
    if delta is None:
        parent = silver_dir(dataset_key, language, "").rstrip("/")
        others = [
            n
            for n in lake.listdir(parent)
            if not n.startswith(("_", "."))
            and n != tok_key
            and open_table(lake.table_uri(f"{parent}/{n}"), storage_options=opts) is not None
        ]
        if others:
            names = [f"{o} ({_tokenizer_name(lake, f'{parent}/{o}')})" for o in others]
            raise TrainingError(
                f"silver in {lake.uri(parent)} was built with tokenizer {', '.join(names)}, "
                f"but model.name_or_path={model_name} uses {tok_key}: run silver with "
                f"model.name_or_path={model_name} (or train the model silver was built for)"
            )
        raise TrainingError(
            f"silver is empty: no committed batch in {lake.uri(table)} "
            f"(source.dataset -> {dataset_key}, source.language -> {language}). Run "
            "`python -m flows silver` with the same source.* and model.name_or_path first."
        )
    version = int(delta.version())
    if fingerprint:
        bad = [
            str(h.get(BATCH_META))
            for h in delta.history()
            if h.get("lakehouse.tokenizer_fingerprint") not in (None, fingerprint)
        ]
        if bad:
            raise TrainingError(
                f"silver batches {bad} in {lake.uri(table)} were tokenized by another "
                f"tokenizer (fingerprint differs from {model_name}'s): rebuild silver with "
                f"model.name_or_path={model_name}"
            )
    batches = committed_batches(lake, table, version=version)
    rows = sum(b.rows for b in batches)
    if rows == 0:
        raise TrainingError(
            f"silver is empty: the committed batches in {lake.uri(table)} "
            "hold 0 rows; ingest more data (bronze, then silver)"
        )
    return SilverSnapshot(
        table=table,
        uri=lake.uri(table),
        version=version,
        rows=rows,
        batches=tuple(batches),
        columns=tuple(arrow_schema(delta).names),
        files=tuple(delta.file_uris()),
    )


def _tokenizer_name(lake: Lakehouse, table: str) -> str:
    delta = open_table(lake.table_uri(table), storage_options=lake.storage_options)
    names = [h.get("lakehouse.tokenizer") for h in (delta.history() if delta else [])]
    return next((n for n in names if n), "?")


def read_silver(
    lake: Lakehouse, snapshot: SilverSnapshot, columns: list[str], cache_dir: str | Path
):
    """A `datasets.Dataset` of the pinned version's `columns` (local folder or az://).

    Azure files are first copied to `cache_dir` (Delta data files never change once written,
    so a file's name is its identity): `datasets` then memory-maps local Arrow, works with
    HF_HUB_OFFLINE=1 (which refuses remote URLs), and no credential enters its cache keys.
    """
    import datasets

    paths = [
        f.removeprefix("file://") if lake.is_local else str(_staged(lake, f, Path(cache_dir)))
        for f in snapshot.files
    ]
    try:
        return datasets.Dataset.from_parquet(paths, columns=columns, cache_dir=str(cache_dir))
    except (ValueError, KeyError) as exc:
        raise TrainingError(
            f"cannot read columns {columns} from silver {snapshot.uri} version "
            f"{snapshot.version}: {exc}. Is it a silver table built by this version "
            "(`python -m flows silver`)?"
        ) from None


def _staged(lake: Lakehouse, uri: str, cache_dir: Path) -> Path:
    """Local copy of a committed data file, downloaded once."""
    rel = lake.rel(uri)
    size = int(lake.info(rel).get("size") or 0)
    local = cache_dir / "silver" / rel.replace("/", "_")
    if local.is_file() and local.stat().st_size == size:
        return local
    tmp = local.with_suffix(".part")
    lake.get_file(rel, tmp)
    tmp.replace(local)
    return local


def eval_bucket(row_id: str) -> float:
    """Stable position of a row in [0, 1): the split depends on `_row_id` only."""
    digest = hashlib.sha256(f"eval-split\x1f{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_row_id(ds, eval_fraction: float, max_eval_samples: int | None = None):
    """(train, eval) by hash of `_row_id`; eval capped at `max_eval_samples` rows.

    Row positions are chosen here and taken with `select`, not with `map`/`filter` over a
    closure: datasets fingerprints such a function with dill, which disassembles its bytecode
    by printing, and inside a `log_prints` flow every line of that went to the run's log.
    """
    buckets = [eval_bucket(r) for r in ds["_row_id"]]
    train_rows = [i for i, b in enumerate(buckets) if b >= eval_fraction]
    eval_rows = [i for i, b in enumerate(buckets) if b < eval_fraction]
    if max_eval_samples is not None and len(eval_rows) > max_eval_samples:
        # Smallest buckets first: the capped eval set is stable as data grows.
        eval_rows = sorted(sorted(eval_rows, key=buckets.__getitem__)[:max_eval_samples])
    return ds.select(train_rows), ds.select(eval_rows)
