"""Lineage: which silver (and bronze) data a run read, as MLflow tags and a dataset input.

A registered model must say what it learned from, precisely enough to read that data back: the
silver table and its pinned version, the batches in it and their bronze parents. Tags carry the
ids and URIs; the dataset input is a reference (source = the table), never a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from dataclasses import dataclass

from tasks.tracking.scrub import MAX_TAG_VALUE


def lineage_from_manifests(
    silver_manifests: list[dict], lakehouse_root: str | None = None
) -> dict[str, str]:
    """Lineage tags: silver and bronze (parent) batch ids and URIs."""
    if not silver_manifests:
        return {}
    ids = [str(m.get("batch_id")) for m in silver_manifests]
    uris = [_batch_uri(m, lakehouse_root) for m in silver_manifests]
    tables = sorted({u.rsplit("/batch=", 1)[0] for u in uris})
    parents = sorted({str(p) for m in silver_manifests for p in m.get("parents") or []})
    tags = {
        "lineage.silver.batch_ids": ",".join(ids),
        "lineage.silver.uris": ",".join(uris),
        "lineage.silver.tables": ",".join(tables),
        "lineage.silver.rows": str(sum(int(m.get("rows") or 0) for m in silver_manifests)),
        "lineage.silver.digest": silver_digest(silver_manifests),
        "lineage.bronze.batch_ids": ",".join(parents),
    }
    bronze_tables = sorted(
        {
            str(m["extra"]["bronze_table"])
            for m in silver_manifests
            if isinstance(m.get("extra"), dict) and m["extra"].get("bronze_table")
        }
    )
    if bronze_tables:
        tags["lineage.bronze.tables"] = ",".join(_join(lakehouse_root, t) for t in bronze_tables)
    too_long = [k for k, v in tags.items() if len(v) > MAX_TAG_VALUE]
    for k in too_long:
        tags[k] = tags[k][: MAX_TAG_VALUE - 60] + ",...(see artifact lineage/silver_manifests.json)"
    return tags


def silver_digest(silver_manifests: list[dict]) -> str:
    """A short digest of the silver batch ids (MLflow allows 36 characters)."""
    ids = "\n".join(sorted(str(m.get("batch_id")) for m in silver_manifests))
    return hashlib.sha256(ids.encode()).hexdigest()[:32]


def _join(root: str | None, rel: str) -> str:
    if not root or "://" in rel or rel.startswith("/"):
        return rel
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def _batch_uri(m: dict, root: str | None) -> str:
    if m.get("uri"):
        return str(m["uri"])
    return _join(root, f"{m.get('table', '')}/batch={m.get('batch_id')}")


def log_silver_input(client, run_id: str, silver_manifests: list[dict], root: str | None) -> None:
    """Log the silver batches as one MLflow dataset input (a reference, not a copy)."""
    from mlflow.entities import DatasetInput, InputTag

    run = client.get_run(run_id)
    digest = silver_digest(silver_manifests)
    inputs = run.inputs.dataset_inputs if run.inputs else []
    if any(d.dataset.digest == digest for d in inputs or []):
        return  # already logged by an earlier attempt
    dataset = _silver_dataset(silver_manifests, root, digest)
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")]
            )
        ],
    )


def _silver_dataset(silver_manifests: list[dict], root: str | None, digest: str):
    from mlflow.data.meta_dataset import MetaDataset

    first = silver_manifests[0]
    table = _batch_uri(first, root).rsplit("/batch=", 1)[0]
    name = (
        "silver/" + "/".join(str(first.get(k)) for k in ("dataset", "language") if first.get(k))
        or "silver"
    )
    return MetaDataset(
        _dataset_source(table),
        name=name[:500],
        digest=digest,
        schema=_mlflow_schema(first.get("schema") or first.get("schema_") or {}),
    )


def _dataset_source(table_uri: str):
    """A local folder resolves to MLflow's own source type; az:// gets a small generic one."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from tasks.tracking.dataset_source import LakehouseDatasetSource

    with contextlib.suppress(Exception), warnings.catch_warnings():
        # MLflow warns that a local path matches its local source type twice; harmless.
        warnings.simplefilter("ignore", UserWarning)
        if "://" not in table_uri or table_uri.startswith(("file://", "abfss://", "wasbs://")):
            return resolve_dataset_source(table_uri)

    return LakehouseDatasetSource(table_uri)


def _mlflow_schema(schema: dict[str, str]):
    """Manifest column types (pyarrow names) as an MLflow schema; unknown types are left out."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    scalar = {
        "string": DataType.string,
        "large_string": DataType.string,
        "int64": DataType.long,
        "int32": DataType.integer,
        "int16": DataType.integer,
        "double": DataType.double,
        "float": DataType.float,
        "bool": DataType.boolean,
        "timestamp[us, tz=UTC]": DataType.datetime,
        "binary": DataType.binary,
    }
    cols = []
    for name, typ in schema.items():
        typ = str(typ)
        m = re.fullmatch(r"(?:large_)?list<(?:item|element): (\w+)>", typ)
        if typ in scalar:
            cols.append(ColSpec(scalar[typ], name))
        elif m and m.group(1) in scalar:
            cols.append(ColSpec(Array(scalar[m.group(1)]), name))
    return Schema(cols) if cols else None


def silver_version_tags(table_uri: str, version: int | str, rows: int) -> dict[str, str]:
    """Tags naming the pinned silver version a run read (Delta: table URI + version)."""
    return {
        "lineage.silver.table": table_uri,
        "lineage.silver.version": str(version),
        "lineage.silver.rows": str(rows),
    }


@dataclass(frozen=True)
class EvalSetIdentity:
    """Which held-out rows a score was computed on: same identity, comparable numbers.

    The rows are the eval split (by hash of `_row_id`) of one pinned silver version; `hash` is
    a digest of their sorted row ids, so two runs compared "on the same rows" can prove it.
    """

    table_uri: str
    version: str
    rows: int
    hash: str

    def tags(self) -> dict[str, str]:
        return {
            "eval.table": self.table_uri,
            "eval.table_version": self.version,
            "eval.rows": str(self.rows),
            "eval.hash": self.hash,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvalSetIdentity | None:
        """The identity recorded by `tags()`, or None when a run or version has none."""
        if not tags.get("eval.hash"):
            return None
        return cls(
            table_uri=tags.get("eval.table", ""),
            version=tags.get("eval.table_version", ""),
            rows=int(tags.get("eval.rows") or 0),
            hash=tags["eval.hash"],
        )


def eval_set_identity(
    table_uri: str, version: int | str, row_ids: list[str] | tuple[str, ...]
) -> EvalSetIdentity:
    """The identity of the held-out rows `row_ids` of `table_uri` at `version`."""
    digest = hashlib.sha256("\n".join(sorted(row_ids)).encode()).hexdigest()[:32]
    return EvalSetIdentity(table_uri, str(version), len(row_ids), digest)
