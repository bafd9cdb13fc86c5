"""Silver for training: find the model's silver table, read committed batches, hold out eval.

Only committed batches are read (folders with `_manifest.json`), and only the files their
manifests name, so leftovers of a crashed silver run never reach training. The evaluation split
is chosen by a hash of `_row_id`: a row stays on its side across runs and when new batches land.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.errors import UserError
from tasks.lakehouse.layout import silver_dir
from tasks.lakehouse.manifest import Manifest, committed_manifests
from tasks.lakehouse.storage import Lakehouse

# The tokenizer identity (silver tables are keyed by it): one definition, tasks.silver.tokenize.
from tasks.silver.tokenize import tokenizer_fingerprint, tokenizer_key  # noqa: F401 - re-exported

TRAIN_COLUMNS = ["_row_id", "input_ids", "num_tokens"]
PAIR_COLUMNS = ["labels"]


class TrainingError(UserError, ValueError):
    """Training cannot start or go on; the message names the field or file and the fix."""


# --------------------------------------------------------------------------------------------
# Finding the committed silver batches
# --------------------------------------------------------------------------------------------


def find_silver(
    lake: Lakehouse,
    dataset_key: str,
    language: str,
    tok_key: str,
    model_name: str,
    fingerprint: str | None = None,
) -> tuple[str, list[Manifest]]:
    """The silver table for this tokenizer and its committed manifests, or a TrainingError."""
    table = silver_dir(dataset_key, language, tok_key)
    manifests = committed_manifests(lake, table)
    if not manifests:
        parent = silver_dir(dataset_key, language, "").rstrip("/")
        others = [
            n
            for n in lake.listdir(parent)
            if not n.startswith(("_", "."))
            and n != tok_key
            and committed_manifests(lake, f"{parent}/{n}")
        ]
        if others:
            names = []
            for other in others:
                m = committed_manifests(lake, f"{parent}/{other}")[0]
                names.append(f"{other} ({m.extra.get('tokenizer_name', '?')})")
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
    if fingerprint:
        bad = [
            m.batch_id
            for m in manifests
            if m.extra.get("tokenizer_fingerprint") not in (None, fingerprint)
        ]
        if bad:
            raise TrainingError(
                f"silver batches {bad} in {lake.uri(table)} were tokenized by another "
                f"tokenizer (fingerprint differs from {model_name}'s): rebuild silver with "
                f"model.name_or_path={model_name}"
            )
    if sum(m.rows for m in manifests) == 0:
        raise TrainingError(
            f"silver is empty: the committed batches in {lake.uri(table)} "
            "hold 0 rows; ingest more data (bronze, then silver)"
        )
    return table, manifests


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def silver_columns(manifests: list[Manifest]) -> set[str]:
    """Columns the committed batches declare in their schema (empty when not recorded)."""
    cols: set[str] | None = None
    for m in manifests:
        if m.schema_:
            cols = set(m.schema_) if cols is None else cols & set(m.schema_)
    return cols or set()


def read_silver(
    lake: Lakehouse,
    manifests: list[Manifest],
    columns: list[str],
    cache_dir: str | Path,
):
    """A `datasets.Dataset` of the committed files' `columns` (local folder or az://).

    Azure files are first copied to `cache_dir` and checked against the manifest's sha256:
    `datasets` then memory-maps local Arrow, works with HF_HUB_OFFLINE=1 (which refuses remote
    URLs), and no credential enters its cache keys.
    """
    import datasets

    paths = []
    for m in manifests:
        for entry, rel in zip(m.files, m.file_paths(), strict=True):
            paths.append(
                str(lake.local_path(rel))
                if lake.is_local
                else str(_staged(lake, rel, entry.sha256, Path(cache_dir)))
            )
    try:
        return datasets.Dataset.from_parquet(paths, columns=columns, cache_dir=str(cache_dir))
    except (ValueError, KeyError) as exc:
        raise TrainingError(
            f"cannot read columns {columns} from silver {lake.uri(manifests[0].table)}: {exc}. "
            "Is it a silver table built by this version (`python -m flows silver`)?"
        ) from None


def _staged(lake: Lakehouse, rel: str, sha256: str, cache_dir: Path) -> Path:
    """Local copy of a committed file, downloaded once and verified against its manifest."""
    from tasks.lakehouse.storage import sha256_file

    local = cache_dir / "silver" / sha256[:2] / f"{sha256}.parquet"
    if local.is_file() and sha256_file(local) == sha256:
        return local
    tmp = local.with_suffix(".part")
    lake.get_file(rel, tmp)
    if sha256_file(tmp) != sha256:
        tmp.unlink(missing_ok=True)
        raise TrainingError(
            f"{lake.uri(rel)} does not match the sha256 in its manifest: the "
            "committed silver file was changed; rebuild that silver batch"
        )
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
