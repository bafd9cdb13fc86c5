"""Batches as a reader sees them in a Delta table: which were committed, in which version.

A batch is what one writer commits under one application transaction (a bronze unit, a silver
batch). Identity and row counts come from the rows' lineage columns (`_batch_id`, and for
bronze `_source_file` / `_source_version`, for silver `_bronze_batch_id`); the version that
committed a batch comes from the table's history, so readers can order batches by commit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from tasks.lakehouse.delta import BATCH_META, open_table
from tasks.lakehouse.storage import Lakehouse

GROUP_COLUMNS = ("_batch_id", "_source_file", "_source_version", "_bronze_batch_id")


@dataclass(frozen=True)
class Batch:
    """One committed batch of a table version."""

    batch_id: str
    rows: int
    version: int  # the table version whose commit added it
    sources: tuple[tuple[str, str], ...] = ()  # bronze: (source uri, content fingerprint)
    parents: tuple[str, ...] = ()  # silver and rejected: the bronze batch ids


def committed_batches(lake: Lakehouse, rel: str, *, version: int | None = None) -> list[Batch]:
    """The batches of table `rel` (at `version`, default latest), oldest commit first.

    An absent table has no batches. Only the small lineage columns are read.
    """
    table = open_table(lake.table_uri(rel), storage_options=lake.storage_options, version=version)
    if table is None:
        return []
    names = set(_names(table))
    columns = [c for c in GROUP_COLUMNS if c in names]
    if "_batch_id" not in columns:
        return []
    rows = table.to_pyarrow_dataset().to_table(columns=columns)
    return _group(rows, commit_versions(table))


def _names(table) -> list[str]:
    schema = table.schema()
    arrow = schema.to_arrow() if hasattr(schema, "to_arrow") else schema.to_pyarrow()
    return pa.schema(arrow).names


def commit_versions(table) -> dict[str, int]:
    """batch id -> the version that committed it, from the commit metadata of the history."""
    out: dict[str, int] = {}
    for entry in table.history():
        bid = entry.get(BATCH_META)
        if bid and "version" in entry:
            out.setdefault(str(bid), int(entry["version"]))
    return out


def _group(rows: pa.Table, versions: dict[str, int]) -> list[Batch]:
    counts: dict[str, int] = defaultdict(int)
    sources: dict[str, set[tuple[str, str]]] = defaultdict(set)
    parents: dict[str, set[str]] = defaultdict(set)
    grouped = rows.group_by(rows.column_names).aggregate([([], "count_all")])
    for r in grouped.to_pylist():
        bid = r["_batch_id"]
        counts[bid] += r["count_all"]
        if r.get("_source_file") is not None:
            sources[bid].add((r["_source_file"], r.get("_source_version") or ""))
        if r.get("_bronze_batch_id") is not None:
            parents[bid].add(r["_bronze_batch_id"])
    batches = [
        Batch(
            batch_id=bid,
            rows=n,
            version=versions.get(bid, -1),
            sources=tuple(sorted(sources[bid])),
            parents=tuple(sorted(parents[bid])),
        )
        for bid, n in counts.items()
    ]
    return sorted(batches, key=lambda b: (b.version, b.batch_id))
