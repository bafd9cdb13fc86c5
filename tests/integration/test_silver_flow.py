"""The silver flow on an Azure lakehouse (real Azurite, real Prefect, real Spark)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from flows.params import PipelineParams
from tasks.silver.plan import SilverError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def texts(lang: str) -> list[str]:
    with open(SAMPLE / "culturax" / f"{lang}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def make_params(
    root: str, block: str | None, data_files: Path, model: Path, language: str, **source
) -> PipelineParams:
    return PipelineParams.model_validate(
        {
            "lakehouse": {"root": root, "block": block},
            "source": {
                "dataset": "json",
                "data_files": str(data_files),
                "language": language,
                **source,
            },
            "transform": {"min_chars": 20, "spark_master": "local[2]"},
            "model": {"name_or_path": str(model)},
        }
    )


def read_silver(lake, uri: str, version: int | None = None) -> list[dict]:
    """The rows of the silver Delta table at `uri` (latest version, or `version`)."""
    from tasks.lakehouse.delta import read_version

    table = read_version(
        lake.table_uri(lake.rel(uri)), storage_options=lake.storage_options, version=version
    )
    return table.sort_by("_row_id").to_pylist() if table.num_rows else []


def silver_events(batch_id: str, timeout: float = 120) -> list:
    """The server's lakehouse.silver.committed events of this batch, once stored (events are
    sent in the background and stored asynchronously: wait for them, not for a fixed time)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(
                EventFilter(event=EventNameFilter(name=["lakehouse.silver.committed"])), limit=50
            )
        found = [e for e in page.events if batch_id in e.payload.get("batch_ids", [])]
        if found or time.time() > deadline:
            return found
        time.sleep(0.5)


def test_silver_flow_on_azure(azure_lakehouse, spark, tiny_models, tmp_path, jsonl_factory):
    from flows.bronze import bronze_flow
    from flows.silver import silver_flow
    from tasks.lakehouse.storage import open_lakehouse

    root, block = azure_lakehouse["root"], azure_lakehouse["block"]
    lang = f"t{uuid.uuid4().hex[:6]}"
    src = tmp_path / "landing"
    first = texts("es")[:200]
    jsonl_factory("1.jsonl", [{"text": t} for t in first], folder=src)
    params = make_params(root, block, src, tiny_models["t5"], lang)

    empty = silver_flow(params=params)
    assert empty.batch_ids == [] and "no committed bronze" in empty.message

    b1 = bronze_flow(params=params)
    r1 = silver_flow(params=params)
    assert r1.parent_batch_ids == b1.batch_ids and len(r1.batch_ids) == 1
    assert r1.rows + sum(r1.rejected.values()) == b1.rows
    assert r1.uri.startswith("az://") and r1.tokenizer.startswith("tiny-t5-")

    lake = open_lakehouse(root, block)
    from tasks.silver.tokenize import load_tokenizer

    tok = load_tokenizer(str(tiny_models["t5"]))
    rows = read_silver(lake, r1.uri)
    assert len(rows) == r1.rows
    from tasks.lakehouse.delta import latest_version

    first_version = latest_version(
        lake.table_uri(lake.rel(r1.uri)), storage_options=lake.storage_options
    )
    assert {r["_bronze_batch_id"] for r in rows} == set(b1.batch_ids)
    assert [r["input_ids"] for r in rows] == [tok(r["text"])["input_ids"] for r in rows]

    # Second file: 30 rows already in silver (old hashes are staged from Azure) + 60 new.
    jsonl_factory("2.jsonl", [{"text": t} for t in first[:30] + texts("it")[:60]], folder=src)
    b2 = bronze_flow(params=params)
    r2 = silver_flow(params=params)
    assert r2.parent_batch_ids == b2.batch_ids
    assert r2.rejected.get("duplicate", 0) >= 28  # a couple of the 30 were rejected before
    assert r2.rows + sum(r2.rejected.values()) == b2.rows == 90
    all_rows = read_silver(lake, r1.uri)
    assert len({r["_text_hash"] for r in all_rows}) == len(all_rows) == r1.rows + r2.rows
    # The first version is untouched by the second commit.
    assert read_silver(lake, r1.uri, version=1) == rows  # v0 created the table
    from tasks.lakehouse.delta import latest_version, transaction_version
    from tasks.lakehouse.layout import rejected_dir
    from tasks.silver.plan import silver_app_id

    rejected_uri = lake.table_uri(rejected_dir("json", lang, r1.tokenizer))
    silver_uri = lake.table_uri(lake.rel(r1.uri))
    opts = lake.storage_options
    for parent in r1.parent_batch_ids + r2.parent_batch_ids:  # each batch committed once
        assert transaction_version(silver_uri, silver_app_id(parent), storage_options=opts) == 1
        assert transaction_version(rejected_uri, silver_app_id(parent), storage_options=opts) == 1
    versions = (
        latest_version(silver_uri, storage_options=opts),
        latest_version(rejected_uri, storage_options=opts),
    )
    assert versions[0] == first_version + 1  # one commit for the second batch

    again = silver_flow(params=params)
    assert again.batch_ids == [] and again.message.startswith("nothing to do")
    assert (
        latest_version(silver_uri, storage_options=opts),
        latest_version(rejected_uri, storage_options=opts),
    ) == versions  # nothing committed

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import artifact_key

    key = artifact_key("silver", "json", lang)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert arts and {a.type for a in arts} == {"table"}
    tables = [a.data if isinstance(a.data, list) else json.loads(a.data) for a in arts]
    assert any(
        row["batch"] in r2.batch_ids and row["duplicate"] >= 28 for table in tables for row in table
    )

    [event] = silver_events(r2.batch_ids[0])
    assert event.resource.id == f"lakehouse.silver.json.{lang}"
    assert event.payload["tokenizer"] == r2.tokenizer


def test_silver_flow_names_a_missing_column(
    prefect_harness, spark, tiny_models, tmp_path, jsonl_factory
):
    from flows.bronze import bronze_flow
    from flows.silver import silver_flow

    src = tmp_path / "landing"
    jsonl_factory("a.jsonl", [{"content": "Un texte assez long pour passer."}], folder=src)
    params = make_params(
        str(tmp_path / "lake"), None, src, tiny_models["t5"], "fr", text_column="content"
    )
    bronze_flow(params=params)
    wrong = params.model_copy(
        update={"source": params.source.model_copy(update={"text_column": "text"})}
    )
    with pytest.raises(SilverError, match=r"no column 'text'.*\['content'\]"):
        silver_flow(params=wrong)
