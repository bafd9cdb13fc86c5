"""Bad input through the real bronze and silver flows: a clear error, or quarantined and counted."""

from __future__ import annotations

import json
import uuid

import pytest

from flows.params import load_params
from tasks.bronze.sources import SourceError
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import latest_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tests.conftest import last_json, run_cli

pytestmark = pytest.mark.reliability


def _bronze(root, data_files=None, **extra):
    from flows.bronze import bronze_flow

    overrides = ["source.language=xx", f"lakehouse.root={root}"]
    overrides += [f"source.data_files={data_files}"] if data_files else []
    overrides += [f"{k}={v}" for k, v in {"source.dataset": "json", **extra}.items()]
    return bronze_flow(params=load_params(overrides=overrides))


def test_bronze_refuses_bad_sources_plainly(prefect_harness, tmp_path):
    """Each bad source fails with a SourceError naming the file/field and the fix; no commit."""
    root = tmp_path / "lake"
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "renamed.jsonl").write_text(json.dumps({"content": "a renamed column"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"source": "x", "tgt": "y"}) + "\n")
    cases = {
        "empty_source": ({"data_files": tmp_path / "empty.jsonl"}, r"empty\.jsonl: empty source"),
        "changed_column": (
            {"data_files": tmp_path / "renamed.jsonl"},
            r"no column 'text' \(source\.text_column\).*\['content'\]",
        ),
        "missing_target": (
            {
                "data_files": tmp_path / "pairs.jsonl",
                "source.text_column": "source",
                "source.target_column": "target",
            },
            r"no column 'target'",
        ),
        "no_data_files": (
            {"data_files": "null"},
            r"source\.dataset='json' needs source\.data_files",
        ),
        "glob_matches_nothing": ({"data_files": tmp_path / "nope" / "*.jsonl"}, r"matches no file"),
        "wrong_dataset_config": (
            {"source.dataset": "no-such-org/no-such-dataset", "source.name": "zz"},
            r"source\.(dataset|name)=",
        ),
    }
    for case, (kw, pattern) in cases.items():
        with pytest.raises(SourceError, match=pattern):
            _bronze(root, **kw)
            pytest.fail(f"{case}: no error")
        print(f"reliability: input={case} outcome=SourceError")
    lake = open_lakehouse(str(root))
    assert committed_batches(lake, bronze_dir("json", "xx")) == []
    # Refused before any write: no table was created, not even an empty one.
    assert latest_version(lake.table_uri(bronze_dir("json", "xx")), storage_options={}) is None
    print(f"reliability: bad_sources_refused={len(cases)} commits=0")


def test_bad_rows_quarantined_and_counted(prefect_harness, tiny_models, tmp_path):
    """Bad rows in one pairs file: every bronze row ends in silver or rejected with a reason."""
    tag = uuid.uuid4().hex[:6]
    good = [
        {
            "id": i,
            "source": f"{tag} phrase numero {i} avec assez de mots pour passer",
            "target": f"{tag} sentence number {i} with enough words",
        }
        for i in range(20)
    ]
    bad = [
        dict(good[0]),
        dict(good[1]),  # duplicate ids and rows
        {"id": 100, "source": f"{tag} une phrase sans cible du tout", "target": None},
        {"id": 101, "source": f"{tag} une phrase avec une cible vide", "target": ""},
        {"id": 102, "source": None, "target": "no source"},
        {"id": 103, "source": "mot " * 2_500_000, "target": "a 10 MB row"},  # ~10 MB
    ]
    path = tmp_path / "in" / "pairs.jsonl"
    path.parent.mkdir()
    with open(path, "wb") as fh:
        for r in good + bad:
            fh.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        # Not UTF-8 (Latin-1 bytes): bronze keeps the row, silver quarantines it.
        fh.write(b'{"id": 104, "source": "' + b"\xe9\xe8\xff" * 40 + b'", "target": "x"}\n')
    root = tmp_path / "lake"
    common = [
        "--set",
        "source.dataset=json",
        "--set",
        "source.language=xx",
        "--set",
        f"lakehouse.root={root}",
        "--set",
        "source.text_column=source",
        "--set",
        "source.target_column=target",
    ]
    b = run_cli("flows", "bronze", "--set", f"source.data_files={path}", *common, "--json")
    assert b.returncode == 0, b.stderr[-3000:]
    bronze_out = last_json(b.stdout)
    assert bronze_out["rows"] == 27
    [batch] = committed_batches(open_lakehouse(str(root)), bronze_dir("json", "xx"))
    assert (batch.batch_id, batch.rows) == (bronze_out["batch_ids"][0], 27)
    assert "not valid UTF-8" in b.stdout + b.stderr
    s = run_cli(
        "flows",
        "silver",
        *common,
        "--set",
        f"model.name_or_path={tiny_models['t5']}",
        "--set",
        "transform.spark_master=local[2]",
        "--json",
    )
    assert s.returncode == 0, s.stderr[-3000:]
    out = last_json(s.stdout)
    assert out["rejected"] == {
        "bad_encoding": 1,
        "duplicate": 2,
        "null_target": 2,
        "null_text": 1,
        "too_long": 1,
    }, out
    assert out["rows"] == 20 and out["rows"] + sum(out["rejected"].values()) == 27
    print(
        f"reliability: inputs=pairs_with_bad_rows bronze_rows=27 silver_rows={out['rows']} "
        f"rejected={out['rejected']} rows_lost=0"
    )

    # A model whose tokenizer did not make this silver: training refuses to plan on it.
    from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
    from tasks.train.data import TrainingError
    from tasks.train.plan import build_train_plan

    with pytest.raises(TrainingError) as err:
        build_train_plan(
            lakehouse=LakehouseParams(root=str(root)),
            source=SourceParams(dataset="json", language="xx"),
            model=ModelParams(
                name_or_path=str(tiny_models["mbart"]), max_source_length=64, max_target_length=32
            ),
            train=TrainParams(
                objective="supervised", noise_density=0.15, mean_noise_span_length=3.0
            ),
        )
    print(f"reliability: input=tokenizer_mismatch outcome=TrainingError: {str(err.value)[:160]}")
