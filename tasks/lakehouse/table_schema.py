"""What a Delta table of the lakehouse accepts: column types and protocol features.

A column's Delta type never changes (integers and floats may widen into the table's type);
new columns come in only by schema merge (bronze). Tables stay at protocol reader 1 / writer 2:
deletion vectors or column mapping would make the live file list differ from the rows.
"""

from __future__ import annotations

import json

import pyarrow as pa
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema

from tasks.lakehouse.delta_access import TableError

WIDENING = {
    ("byte", "short"),
    ("byte", "integer"),
    ("byte", "long"),
    ("short", "integer"),
    ("short", "long"),
    ("integer", "long"),
    ("float", "double"),
}


def storable_type(t: pa.DataType, *, table: bool = False) -> pa.DataType:
    """An all-null column as string (what Spark infers for it; Delta has no null type); for a
    new `table`, timestamps in microseconds (delta-rs stores those; nanoseconds would need a
    newer protocol)."""
    if pa.types.is_null(t):
        return pa.string()
    if table and pa.types.is_timestamp(t):
        return pa.timestamp("us", t.tz)
    return t


def conform_schema(
    table: pa.Schema, data: pa.Schema, *, merge: bool, what: str, exact: bool = False
) -> pa.Schema:
    """`data`'s schema to write into a table of `table`'s (a cast widens integers/floats).

    Raises TableError naming the first column whose Delta type differs, that is new without
    merge, or (without merge, unless `exact` file checks) that the rows lack.
    """
    if not exact:  # rows, not files: all-null columns are stored as string
        data = pa.schema([f.with_type(storable_type(f.type)) for f in data])
    have, want = delta_types(table, what), delta_types(data, what)
    target = []
    for f in data:
        if f.name not in have:
            if not merge:
                raise TableError(
                    f"{what}: column {f.name!r} is not in the table (columns {table.names})."
                )
            target.append(f)
        elif want[f.name] == have[f.name]:
            target.append(f)
        elif not exact and (want[f.name], have[f.name]) in WIDENING:
            target.append(f.with_type(table.field(f.name).type))
        else:
            raise TableError(
                f"{what}: column {f.name!r} is {want[f.name]} but the table has "
                f"{have[f.name]}; a column's type never changes. Rename or cast "
                "the source column, or write to a new table."
            )
    missing = [n for n in table.names if n not in want]
    if missing and not merge and not exact:
        raise TableError(f"{what}: rows lack column(s) {missing} of the table.")
    return pa.schema(target)


def delta_types(schema: pa.Schema, what: str) -> dict[str, str]:
    """Column -> Delta type (nested types as JSON without nullability), as readers see it."""

    def bare(t: object) -> object:
        if isinstance(t, dict):
            return {
                k: bare(v)
                for k, v in t.items()
                if k not in ("nullable", "containsNull", "valueContainsNull", "metadata")
            }
        return [bare(x) for x in t] if isinstance(t, list) else t

    types = {}
    for f in schema:
        if pa.types.is_timestamp(f.type):  # delta-rs stores every timestamp in microseconds
            f = f.with_type(pa.timestamp("us", f.type.tz))
        try:
            [delta] = json.loads(DeltaSchema.from_arrow(pa.schema([f])).to_json())["fields"]
        except Exception:  # noqa: BLE001 - delta-rs says only "unsupported"
            raise TableError(
                f"{what}: column {f.name!r} has type {f.type}, which a Delta "
                "table cannot store; cast it in the source."
            ) from None
        types[f.name] = json.dumps(bare(delta["type"]), sort_keys=True).strip('"')
    return types


def check_protocol(table: DeltaTable, uri: str) -> None:
    """Refuse a table whose protocol needs features our file-list readers would get wrong."""
    p = table.protocol()
    reader = set(p.reader_features or []) - {"timestampNtz"}
    writer = set(p.writer_features or []) - {"appendOnly", "invariants", "timestampNtz"}
    if (
        p.min_reader_version in (1, 3)
        and p.min_writer_version in (1, 2, 7)
        and not (reader or writer)
    ):
        return
    raise TableError(
        f"Table {uri} needs Delta reader {p.min_reader_version} / writer "
        f"{p.min_writer_version} (features: {sorted(reader | writer) or 'none'}). This pipeline "
        "reads and writes tables up to reader 1 / writer 2 (no deletion vectors or column "
        "mapping), so that its file-list readers see exactly the committed rows. Use another "
        "table path, or rewrite the table without these features."
    )
