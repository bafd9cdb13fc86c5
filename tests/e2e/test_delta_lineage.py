"""A registered model's training rows stay readable: pinned silver version, maintenance, readers.

Real Prefect (test harness), real Spark, real MLflow (SQLite store), tiny T5, Delta tables on a
local folder. Two models are trained on two silver versions; `maintain` then compacts,
checkpoints and vacuums; the first version's pinned rows still come back exactly, through
delta-rs and through a reader that replays the `_delta_log` without delta-rs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable

from flows.bronze import bronze_flow
from flows.maintain import maintain_flow
from flows.params import PipelineParams
from flows.silver import silver_flow
from flows.train import train_flow
from tests.delta_reader import read_delta

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "culturax"


def _params(root: Path, files: list[Path], model: Path, mlflow_uri: str) -> PipelineParams:
    return PipelineParams.model_validate(
        {
            "lakehouse": {"root": str(root)},
            "source": {"dataset": "json", "data_files": [str(f) for f in files], "language": "xx"},
            "transform": {"spark_master": "local[2]"},
            "model": {"name_or_path": str(model), "max_source_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, "save_steps": 2, "eval_steps": 2},
            "tracking": {"uri": mlflow_uri, "registered_model": "lineage-t5"},
        }
    )


def _version_tags(mlflow_uri: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    mv = client.get_model_version("lineage-t5", version)
    return client.get_run(mv.run_id).data.tags


def _half(src: Path, dst: Path, part: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[part::2]) + "\n", encoding="utf-8")
    return dst


def test_pinned_silver_version_survives_new_data_and_maintenance(
    tmp_path, tiny_models, prefect_harness
):
    root, mlflow_uri = tmp_path / "lake", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = [_half(SAMPLE / "en.jsonl", tmp_path / "en-a.jsonl", 0)]
    params = _params(root, first, tiny_models["t5"], mlflow_uri)
    bronze_flow(params=params)
    silver_flow(params=params)
    v1 = train_flow(params=params)
    tags = _version_tags(mlflow_uri, v1.model_version)
    table_uri, pinned = tags["lineage.silver.table"], int(tags["lineage.silver.version"])
    rows_v1 = DeltaTable(table_uri, version=pinned).to_pyarrow_table()
    assert rows_v1.num_rows == int(tags["lineage.silver.rows"]) > 0

    # More data lands; a second model trains on the newer silver version.
    params2 = _params(
        root,
        [*first, _half(SAMPLE / "en.jsonl", tmp_path / "en-b.jsonl", 1)],
        tiny_models["t5"],
        mlflow_uri,
    )
    bronze_flow(params=params2)
    assert silver_flow(params=params2).batch_ids
    v2 = train_flow(params=params2)
    assert int(_version_tags(mlflow_uri, v2.model_version)["lineage.silver.version"]) > pinned

    result = maintain_flow(params=params2)
    assert pinned in result.pinned[table_uri]
    assert DeltaTable(table_uri).version() > pinned  # maintenance committed on top

    # The first model's rows come back exactly, through delta-rs and through the log replay.
    again = DeltaTable(table_uri, version=pinned).to_pyarrow_table()
    assert sorted(again.column("_row_id").to_pylist()) == sorted(
        rows_v1.column("_row_id").to_pylist()
    )
    replayed = read_delta_table(table_uri, version=pinned)
    assert replayed.num_rows == rows_v1.num_rows
    assert set(replayed.column("_row_id").to_pylist()) == set(rows_v1.column("_row_id").to_pylist())

    # Every bronze row is in silver or rejected, read without delta-rs.
    bronze = read_delta_table(str(root / "bronze" / "json" / "xx"))
    tok = Path(table_uri).name
    rejected = read_delta_table(str(root / "rejected" / "json" / "xx" / tok))
    silver = read_delta_table(table_uri)
    assert silver.num_rows + rejected.num_rows == bronze.num_rows
    ids = pc.unique(
        pa.concat_arrays([t.column("_row_id").combine_chunks() for t in (silver, rejected)])
    )
    assert len(ids) == bronze.num_rows
    assert set(ids.to_pylist()) == set(bronze.column("_row_id").to_pylist())
    assert json.loads(json.dumps(result.model_dump()))["tables"]


def read_delta_table(path: str, version: int | None = None):
    """A local Delta table replayed from its `_delta_log` with pyarrow only."""
    return read_delta(pafs.LocalFileSystem(), path, version)
