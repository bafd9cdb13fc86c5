"""Unit tests for flows.params: validation, overrides, secret refusal, the flow's UI schema."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.params import (
    PipelineParams,
    SecretInParameterError,
    dataset_slug,
    flatten,
    load_params,
    parse_override,
)
from tests.conftest import run_cli

CONN = "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc"


def test_defaults_come_from_demo_config():
    p = load_params()
    assert p.lakehouse.root == "./lakehouse"
    assert p.source.dataset == "json"
    assert p.source.language_key == "multi"


def test_overrides_are_typed_and_nested():
    p = load_params(
        overrides=[
            "source.dataset=json",
            "source.data_files=/x/*.jsonl",
            "source.language=xx",
            "source.rows_per_part=100",
            "train.max_steps=7",
            "lakehouse.root=/tmp/lake/",
        ]
    )
    assert p.source.rows_per_part == 100
    assert p.train.max_steps == 7
    assert p.source.data_files == "/x/*.jsonl"
    assert p.lakehouse.root == "/tmp/lake"  # trailing slash trimmed
    assert flatten(p)["source.language"] == "xx"


def test_override_list_and_yaml_values():
    assert parse_override("source.data_files=[a.jsonl, b.jsonl]") == (
        ["source", "data_files"],
        ["a.jsonl", "b.jsonl"],
    )
    assert parse_override("source.name=") == (["source", "name"], None)
    with pytest.raises(ValueError, match="expected key=value"):
        parse_override("source.name")


def test_unknown_section_and_field_are_refused():
    with pytest.raises(ValueError, match="unknown section 'sauce'"):
        load_params(overrides=["sauce.dataset=json"])
    with pytest.raises(ValidationError, match="datset"):
        load_params(overrides=["source.datset=json"])


@pytest.mark.parametrize(
    "item, match",
    [
        ("source.rows_per_part=0", "rows_per_part"),
        ("source.max_rows=-3", "max_rows"),
        ("source.language=fr/../../x", "letters, digits"),
        ("lakehouse.root=s3://bucket/x", "unsupported scheme"),
        ("lakehouse.root=' '", "lakehouse.root is empty"),
    ],
)
def test_bad_values_name_the_field(item, match):
    with pytest.raises(ValidationError, match=match):
        load_params(overrides=[item])


def test_azure_root_needs_block_and_abfs_is_normalised():
    with pytest.raises(ValidationError, match="lakehouse.block is not set"):
        load_params(overrides=["lakehouse.root=az://c/p"])
    p = load_params(
        overrides=[
            "lakehouse.root=abfss://lake@acct.dfs.core.windows.net/demo",
            "lakehouse.block=lh",
        ]
    )
    assert p.lakehouse.root == "az://lake/demo" and p.lakehouse.is_azure


@pytest.mark.parametrize(
    "value",
    [
        CONN,
        "https://acct.blob.core.windows.net/c?sv=2022&sig=abcdefghijklmnop1234",
        "hf_abcdefghijklmnopqrstuvwxyz0123",
        "az://user:password@host/c",
    ],
)
def test_credentials_are_refused(value):
    with pytest.raises(ValidationError) as err:
        PipelineParams.model_validate({"source": {"data_files": value}})
    assert "use" in str(err.value) and "block" in str(err.value)
    with pytest.raises(ValidationError, match="save them in a Prefect block"):
        PipelineParams.model_validate({"lakehouse": {"block": value}})
    with pytest.raises(SecretInParameterError, match="pass the block's name"):
        from flows.params import refuse_secrets

        refuse_secrets({"k": [value]}, "train.extra_args")


def test_secret_in_list_is_refused():
    with pytest.raises(ValidationError, match=r"data_files\[1\] looks like a credential"):
        PipelineParams.model_validate({"source": {"data_files": ["a.jsonl", CONN]}})


def test_cli_refuses_connection_string_with_exit_2():
    res = run_cli("flows", "bronze", "--set", f"source.data_files={CONN}", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "looks like a credential" in res.stderr
    assert "python -m blocks create" in res.stderr
    assert "AccountKey=abc" not in res.stderr  # the secret itself is not echoed
    assert "Traceback" not in res.stderr


def test_dataset_slug():
    assert dataset_slug("uonlp/CulturaX") == "uonlp__CulturaX"
    assert dataset_slug("json") == "json"
    assert dataset_slug("./data/my files/") == "my-files"


def test_flow_parameter_schema_has_sections_and_descriptions():
    """The Prefect UI renders PipelineParams as a typed, documented form."""
    from prefect.utilities.callables import parameter_schema

    from flows.bronze import bronze_flow

    schema = parameter_schema(bronze_flow.fn).model_dump()
    assert list(schema["properties"]) == ["params"]
    defs = schema["definitions"]
    pipeline = defs["PipelineParams"]["properties"]
    assert {"lakehouse", "source", "transform", "model", "train", "tracking"} <= set(pipeline)
    source = defs["SourceParams"]["properties"]
    assert "bounds memory" in source["rows_per_part"]["description"]
    assert "streaming" not in source and "direct_io" not in defs["TransformParams"]["properties"]
    assert source["rows_per_part"]["minimum"] == 1
    assert "block" in defs["LakehouseParams"]["properties"]["block"]["description"]
    assert bronze_flow.parameters.properties["params"]  # what Prefect stores on deploy


@pytest.mark.parametrize(
    ("setting", "why"),
    [("source.streaming=false", "always streams"), ("transform.direct_io=true", "adlfs")],
)
def test_a_removed_setting_says_so(setting, why):
    with pytest.raises(ValidationError) as err:
        load_params(overrides=[setting])
    text = str(err.value)
    assert f"{setting.split('=')[0]} was removed" in text and why in text
