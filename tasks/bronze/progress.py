"""How far each bronze unit got: chunks committed, rows committed, and whether it is partial.

A unit cut short by the row budget (`source.max_rows`) is committed in chunks: chunk k is the
k-th commit of the unit's application transaction (app id = the unit's batch id, version k),
and its own bronze batch (`chunk_batch_id`), so silver picks every chunk up. Row ids stay
`<unit batch id>-<index in the unit>` across chunks.

Progress comes from one table snapshot: the transaction version of the unit's app id (chunks)
and the rows those chunks hold (the index of the unit's next row). A unit is partial when its
last chunk filled its budget (the budget is recorded in the chunk's commit before the rows are
streamed; rows == budget means "maybe more"): the next run reads on from the next row, and when
nothing is left it commits an empty closing chunk, which marks the unit complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow.compute as pc

from tasks.lakehouse.delta import open_table
from tasks.lakehouse.storage import Lakehouse
from tasks.lakehouse.tables import APP_ID_KEY, APP_VERSION_KEY

CHUNK_BUDGET_KEY = "lakehouse.chunk_budget"  # commit metadata: rows the chunk was allowed
CHUNK_OFFSET_KEY = "lakehouse.offset"  # commit metadata: the unit's row index it started at


@dataclass(frozen=True)
class UnitProgress:
    """A unit's state in bronze: chunks committed, rows they hold, and whether more may follow."""

    chunks: int = 0  # commits of the unit's app id (its Delta transaction version)
    rows: int = 0  # rows of the unit committed so far = the index of its next row
    partial: bool = False  # the last chunk filled its row budget: the unit may go on

    @property
    def done(self) -> bool:
        return self.chunks > 0 and not self.partial


def chunk_batch_id(unit_batch_id: str, chunk: int) -> str:
    """The bronze batch id of chunk `chunk` (1-based) of a unit: the unit's id for chunk 1."""
    return unit_batch_id if chunk == 1 else f"{unit_batch_id}.{chunk}"


def unit_progress(lake: Lakehouse, rel: str, app_ids: Iterable[str]) -> dict[str, UnitProgress]:
    """Progress of each unit app id in table `rel` (units never committed are left out)."""
    table = open_table(lake.table_uri(rel), storage_options=lake.storage_options)
    if table is None:
        return {}
    chunks = {a: table.transaction_version(a) or 0 for a in set(app_ids)}
    chunks = {a: k for a, k in chunks.items() if k > 0}
    if not chunks:
        return {}
    # Rows per batch id in this snapshot (only the small lineage column is read).
    ids = table.to_pyarrow_dataset().to_table(columns=["_batch_id"]).column("_batch_id")
    counts = {r["values"]: r["counts"] for r in pc.value_counts(ids).to_pylist() if r["values"]}
    # The budget of each unit's last chunk, from that commit's info (found by app id + version).
    wanted = {(a, str(k)) for a, k in chunks.items()}
    budgets: dict[str, int | None] = {}
    for info in table.history():
        key = (info.get(APP_ID_KEY), info.get(APP_VERSION_KEY))
        if key in wanted:
            raw = info.get(CHUNK_BUDGET_KEY) or ""
            budgets[key[0]] = int(raw) if raw.isdigit() else None
            wanted.discard(key)
            if not wanted:
                break
    out = {}
    for app, k in chunks.items():
        rows = sum(counts.get(chunk_batch_id(app, i), 0) for i in range(1, k + 1))
        budget = budgets.get(app)
        last = counts.get(chunk_batch_id(app, k), 0)
        out[app] = UnitProgress(chunks=k, rows=rows, partial=budget is not None and last >= budget)
    return out
