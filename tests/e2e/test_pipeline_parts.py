"""The parent pipeline's own logic, without a server: run inputs and the summary artifact."""

from __future__ import annotations

import pytest

from flows.params import load_params
from flows.pipeline import with_run_inputs
from tasks.pipeline.summary import summary_markdown


def test_run_inputs_override_params():
    params = load_params()
    assert with_run_inputs(params, None, None) is params
    out = with_run_inputs(
        params,
        ["https://acct.blob.core.windows.net/lake/landing/json/a.jsonl"],
        ["train.max_steps=7", "train.infra=process"],
    )
    assert out.source.data_files == ["az://lake/landing/json/a.jsonl"]
    assert (out.train.max_steps, out.train.infra) == (7, "process")
    assert params.train.max_steps == 60  # the deployment's defaults are untouched


@pytest.mark.parametrize("bad", ["max_steps=3", "nosuch.x=1"])
def test_run_inputs_reject_unknown_keys(bad):
    with pytest.raises(ValueError, match="overrides"):
        with_run_inputs(load_params(), None, [bad])


def test_run_inputs_are_validated():
    with pytest.raises(ValueError, match="max_steps"):
        with_run_inputs(load_params(), None, ["train.max_steps=0"])


def test_summary_lists_layers_rejects_and_mlflow():
    bronze = {"batch_ids": ["b1"], "rows": 10, "uri": "/l/bronze/json/multi", "message": "ok"}
    silver = {
        "batch_ids": ["s1"],
        "rows": 7,
        "rejected": {"too_short": 2, "duplicate": 1},
        "uri": "/l/silver/json/multi/t",
    }
    train = {
        "mlflow_run_id": "abc",
        "model_name": "m",
        "model_version": "3",
        "global_step": 4,
        "train_loss": 1.23456,
        "eval_loss": None,
        "tokens_seen": 99,
        "tokens_per_second": 10.0,
        "checkpoint_uri": "/l/models/r/checkpoint-4",
    }
    md = summary_markdown(bronze, silver, train, None, "inline", "sqlite:///mlflow.db")
    assert "| bronze | 1 | 10 |" in md and "| silver | 1 | 7 |" in md
    assert "| duplicate | 1 |" in md and "| **total** | 3 |" in md
    assert "MLflow run: `abc`" in md and "m v3" in md and "train loss 1.235" in md
    skipped = summary_markdown(
        bronze, {"batch_ids": [], "rows": 0}, None, "no new silver", None, "sqlite:///mlflow.db"
    )
    assert "skipped: no new silver" in skipped and "none" in skipped


def test_numbers_printed_for_people_are_rounded():
    from flows.where import describe

    train = {
        "mlflow_run_id": "abc",
        "model_name": "m",
        "model_version": "3",
        "global_step": 60,
        "train_loss": 2.718281828459045,
        "eval_loss": 3.141592653589793,
        "tokens_seen": 1234567,
        "tokens_per_second": 18881.53157125749,
        "checkpoint_uri": "/l/models/r/checkpoint-60",
    }
    silver = {"batch_ids": ["s"], "rows": 7, "uri": "/l/silver"}
    md = summary_markdown({"batch_ids": ["b"], "rows": 9}, silver, train, None, "inline", "x")
    where = describe({"bronze": None, "silver": silver, "train": train}, None)
    for text in (md, where):
        assert "18,882" in text and "18881.5" not in text, text
        assert "3.142" in text and "3.14159" not in text, text
        assert "2.718" in text and "2.71828" not in text, text
    assert "tokens: 1,234,567 (18,882 tokens/s)" in md
