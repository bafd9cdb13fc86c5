"""Executor-side part writing (tasks.silver.parts) without Spark: names, splits, reports."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.silver.parts import REPORT_SCHEMA, rejected_schema, silver_schema, write_parts
from tasks.silver.tokenize import output_schema


def _rows(bronze: str, n: int, reject_every: int) -> pa.RecordBatch:
    rows = []
    for i in range(n):
        bad = i % reject_every == 0
        rows.append(
            {
                "_row_id": f"{bronze}-{i:010d}",
                "_bronze_batch_id": bronze,
                "_rank": 0,
                "text": f"text {i}",
                "input_ids": None if bad else [1, 2, i],
                "num_tokens": None if bad else 3,
                "_text_hash": None if bad else f"h{i}",
                "reason": "too_short" if bad else None,
                "detail": "short" if bad else None,
            }
        )
    return pa.RecordBatch.from_pylist(rows, schema=output_schema(False))


def test_parts_per_batch_kind_and_size(tmp_path):
    silver, rejected = tmp_path / "silver", tmp_path / "rejected"
    batches = [_rows("b1", 25, 5), _rows("b2", 7, 3)]
    reports = pa.Table.from_batches(
        list(
            write_parts(
                batches,
                silver_dir=str(silver),
                rejected_dir=str(rejected),
                batch_ids={"b1": "s1", "b2": "s2"},
                has_target=False,
                rows_per_part=8,
            )
        ),
        schema=REPORT_SCHEMA,
    ).to_pylist()
    by = {(r["bronze_batch_id"], r["kind"]): [] for r in reports}
    for r in reports:
        by[(r["bronze_batch_id"], r["kind"])].append(r)
    assert sum(r["rows"] for r in by[("b1", "silver")]) == 20
    assert len(by[("b1", "silver")]) == 3  # 8 + 8 + 4 rows
    assert sum(r["rows"] for r in by[("b1", "rejected")]) == 5
    assert sum(json.loads(r["rejected"])["too_short"] for r in by[("b2", "rejected")]) == 3
    for r in reports:
        folder = silver if r["kind"] == "silver" else rejected
        path = folder / r["path"]
        assert r["path"].startswith(f"part-{r['bronze_batch_id']}-00000-")
        assert path.stat().st_size == r["size"]
        table = pq.read_table(path)
        schema = silver_schema(False) if r["kind"] == "silver" else rejected_schema(False)
        assert table.schema.equals(schema) and table.num_rows == r["rows"]
        assert table.column("_row_id")[0].as_py() == r["first_row_id"]
        assert set(table.column("_batch_id").to_pylist()) == {"s" + r["bronze_batch_id"][1:]}
    # A second attempt of the same partition never reuses a name.
    again = list(
        write_parts(
            batches,
            silver_dir=str(silver),
            rejected_dir=str(rejected),
            batch_ids={"b1": "s1", "b2": "s2"},
            has_target=False,
            rows_per_part=8,
        )
    )
    names = {r["path"] for b in again for r in b.to_pylist()}
    assert not names & {r["path"] for r in reports}
