"""Promotion that means something, through the real train flow, MLflow server and registry.

A task the tiny T5 can learn in a few hundred CPU steps (copy short word sequences made from
the shipped sample) shows that fine-tuning helped, by an absolute chrF only real learning
reaches, against the base model scored on the same held-out rows; a second, weaker training on
other data does not take `champion`, and the champion's number is computed on that training's
own held-out rows. Then `make serve`'s command answers REST calls for a T5 and an mBART model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from flows.params import PipelineParams
from tests.conftest import ROOT, free_port
from tests.fixtures.training import write_silver

SAMPLE = ROOT / "data" / "sample" / "culturax" / "en.jsonl"
LEARNED_CHRF = 70.0  # the base model scores < 10; guessing frequent words ~35-45; copying ~90


def copy_pairs(tokenizer, count: int, seed: int, words: int = 40) -> list[dict[str, str]]:
    """`count` pairs whose target copies the source: 2-4 of the sample's most frequent words.

    Thousands of distinct pairs, so 500 steps learn to copy rather than memorise the pairs.
    """
    counts: Counter[str] = Counter()
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        counts.update(w for w in json.loads(line)["text"].split() if w.isalpha())
    vocab = [
        w
        for w, _ in counts.most_common(400)
        if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
    ][:words]
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 4))) for _ in range(count)]
    return [{"text": t, "target": t} for t in texts]


def params_for(root: Path, model: Path, uri: str, name: str, language: str, steps: int):
    return PipelineParams.model_validate(
        {
            "lakehouse": {"root": str(root)},
            "source": {"dataset": "json", "language": language, "target_column": "target"},
            "model": {
                "name_or_path": str(model),
                "max_source_length": 16,
                "max_target_length": 16,
            },
            "train": {
                "objective": "supervised",
                "max_steps": steps,
                "batch_size": 64,
                "learning_rate": 3e-3,
                "eval_steps": steps,
                "save_steps": steps,
                "logging_steps": 25,
                "eval_fraction": 0.05,
                "max_eval_samples": 64,
                "generation_max_length": 16,
                "device": "cpu",
            },
            "tracking": {"uri": uri, "experiment": name, "registered_model": name},
        }
    )


@pytest.fixture(scope="module")
def copy_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny T5 without dropout (it learns copying in a few hundred steps then)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path_factory.mktemp("copy") / "tiny-t5-copy"
    AutoTokenizer.from_pretrained(tiny_models["t5"]).save_pretrained(out)
    AutoModelForSeq2SeqLM.from_pretrained(tiny_models["t5"], dropout_rate=0.0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def promoted(copy_model, mlflow_server, prefect_harness, tmp_path_factory):
    """A learnable task trained and registered, then a weaker challenger trained on other data."""
    from transformers import AutoTokenizer

    from flows.train import train_flow

    tok = AutoTokenizer.from_pretrained(copy_model)
    root = tmp_path_factory.mktemp("promotion") / "lake"
    name = f"copy-{uuid.uuid4().hex[:6]}"
    write_silver(str(root), copy_model, copy_pairs(tok, 8000, seed=1), language="copy-a")
    started = time.monotonic()
    first = train_flow(params=params_for(root, copy_model, mlflow_server.uri, name, "copy-a", 500))
    first_s = time.monotonic() - started
    # New data lands elsewhere; a short training on it is a weaker model.
    write_silver(str(root), copy_model, copy_pairs(tok, 800, seed=2), language="copy-b")
    second = train_flow(params=params_for(root, copy_model, mlflow_server.uri, name, "copy-b", 20))
    print(f"promotion: learnable training {first_s:.0f}s")
    return {"name": name, "first": first, "second": second, "root": root}


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_fine_tuning_learns_the_task_and_beats_the_base_model(promoted, mlflow_server):
    c, first = client(mlflow_server), promoted["first"]
    chrf = {m.step: m.value for m in c.get_metric_history(first.mlflow_run_id, "eval_chrf")}
    base, tuned = chrf[0], chrf[first.global_step]  # step 0 is the base model, on the same rows
    assert tuned >= LEARNED_CHRF, chrf
    assert tuned > base + 40, chrf
    losses = {m.step: m.value for m in c.get_metric_history(first.mlflow_run_id, "eval_loss")}
    assert losses[0] > losses[first.global_step]
    # The first version is champion; its tags and card say on which rows, with which numbers.
    version = c.get_model_version(promoted["name"], first.model_version)
    assert version.aliases == ["champion"]  # `candidate` moved on to the second version
    assert version.tags["promotion.decision"] == "first"
    assert float(version.tags["eval.candidate.eval_chrf"]) == pytest.approx(tuned)
    assert float(version.tags["eval.base.eval_chrf"]) == pytest.approx(base)
    assert "| eval_chrf |" in version.description and "held-out rows" in version.description
    # Samples a person can read: input, reference, base output, fine-tuned output.
    path = c.download_artifacts(first.mlflow_run_id, "eval/samples.json", str(promoted["root"]))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["input", "reference", "base_output", "fine_tuned_output"]
    assert len(table["data"]) == 5
    assert sum(row[3] == row[1] for row in table["data"]) >= 3  # the fine-tuned model copies
    # The same rows in the Prefect table artifact of the run.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import artifact_key

    key = artifact_key("samples", first.metrics["run_name"])
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
    shown = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    assert [list(r.values()) for r in shown] == table["data"]


def test_weaker_challenger_does_not_take_champion_scored_on_its_own_rows(promoted, mlflow_server):
    import datasets
    from deltalake import DeltaTable

    from tasks.pipeline.summary import summary_markdown
    from tasks.train.data import split_by_row_id

    c, name = client(mlflow_server), promoted["name"]
    first, second = promoted["first"], promoted["second"]
    assert c.get_model_version_by_alias(name, "champion").version == first.model_version
    assert c.get_model_version_by_alias(name, "candidate").version == second.model_version
    tags = c.get_model_version(name, second.model_version).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.reason"].startswith("worse")
    assert tags["eval.champion.version"] == first.model_version
    champion, challenger = (float(tags[f"eval.{w}.eval_loss"]) for w in ("champion", "candidate"))
    assert champion < challenger
    # The champion was scored on the challenger's held-out rows, not on its own: the eval set
    # recorded with both numbers is the challenger run's, made of the copy-b table's rows.
    run_tags = c.get_run(second.mlflow_run_id).data.tags
    assert tags["eval.hash"] == run_tags["eval.hash"]
    first_tags = c.get_model_version(name, first.model_version).tags
    assert tags["eval.hash"] != first_tags["eval.hash"]
    assert "copy-b" in tags["eval.table"] and "copy-a" in first_tags["eval.table"]
    pinned = DeltaTable(tags["eval.table"], version=int(tags["eval.table_version"]))
    row_ids = pinned.to_pyarrow_table(columns=["_row_id"]).column("_row_id").to_pylist()
    _, held_out = split_by_row_id(datasets.Dataset.from_dict({"_row_id": row_ids}), 0.05, 64)
    assert int(tags["eval.rows"]) == len(held_out) > 0
    assert float(tags["eval.champion.eval_loss"]) != float(first_tags["eval.candidate.eval_loss"])
    # The pipeline summary shows the three numbers on one set and the decision.
    summary = summary_markdown(
        {}, {}, second.model_dump(mode="json"), None, "inline", mlflow_server.uri
    )
    assert f"champion v{first.model_version}" in summary and "**kept** (eval_loss)" in summary
    assert tags["eval.hash"] in summary


def _serve(uri: str, name: str, port: int) -> subprocess.Popen:
    """`make serve`'s command for `name`, in its own process group."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.serve",
            "--set",
            f"tracking.uri={uri}",
            "--set",
            f"tracking.registered_model={name}",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _invoke(port: int, payload: dict, proc: subprocess.Popen, timeout: float = 240) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())["predictions"]


def _stop(proc: subprocess.Popen, port: int) -> None:
    """SIGTERM the server's process group (as a service manager would); every process of it,
    uvicorn's workers included, is gone within 30 s and the port no longer answers."""
    import psutil

    try:
        group = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        group = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    _, alive = psutil.wait_procs(group, timeout=30)
    assert not alive, f"still running after SIGTERM: {[p.pid for p in alive]}"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)


def register(uri: str, model_dir: Path, objective: str, src_lang: str | None) -> str:
    """Log `model_dir` as a run's pyfunc model and register it (its first version: champion)."""
    from tasks.tracking import registry, runs
    from tasks.tracking.finish import finish_run

    name = f"serve-{objective}-{uuid.uuid4().hex[:6]}"
    run_id = runs.start_run(uri, name, name, {"train.objective": objective}, {})
    example = "Le chat <mask> sur le canapé." if src_lang else "Le chat <extra_id_0> le canapé."
    finish_run(
        run_id,
        uri,
        model_dir,
        {"eval_loss": 9.0},
        {},
        [],
        input_examples=[example],
        model_config={"objective": objective, "src_lang": src_lang},
        retry_for_s=20,
    )
    registry.register_model(run_id, uri, name, {})
    return name


@pytest.fixture
def visible_mbart(tiny_models, tmp_path) -> Path:
    """The tiny mBART with its special tokens biased away: untrained, it would generate only
    language codes (stripped from the output), so nothing would show what `src_lang` did."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "tiny-mbart-visible"
    tok = AutoTokenizer.from_pretrained(tiny_models["mbart"])
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["mbart"])
    with torch.no_grad():
        for i in set(tok.all_special_ids) - {tok.eos_token_id}:
            model.final_logits_bias[0, i] = -1e4
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def test_make_serve_answers_rest_calls_for_t5_and_mbart(mlflow_server, tiny_models, visible_mbart):
    import pandas as pd

    from tasks.tracking.inference import load_champion

    # A T5 span-corruption model and an mBART denoising model, logged and registered as the flow
    # does (their own champions; no training needed to test serving).
    names = {
        "t5": register(mlflow_server.uri, tiny_models["t5"], "span_corruption", None),
        "mbart": register(mlflow_server.uri, visible_mbart, "denoising", "fr_XX"),
    }
    ports = {"t5": free_port(), "mbart": free_port()}
    servers = {key: _serve(mlflow_server.uri, names[key], ports[key]) for key in names}
    t5_call = {
        "dataframe_records": [{"text": "Le chat dort <extra_id_0> le canapé."}],
        "params": {"max_new_tokens": 8},
    }
    mbart_call = {
        "dataframe_records": [
            {"text": "Le chat <mask> sur le canapé.", "src_lang": "fr_XX"},
            {"text": "Le chat <mask> sur le canapé."},  # takes the `src_lang` param
            {"text": "The cat <mask> on the sofa.", "src_lang": "fr_XX"},
        ],
        "params": {"max_new_tokens": 6, "src_lang": "en_XX"},
    }
    try:
        served = {
            "t5": _invoke(ports["t5"], t5_call, servers["t5"]),
            "mbart": _invoke(ports["mbart"], mbart_call, servers["mbart"]),
        }
    finally:
        for key, proc in servers.items():
            _stop(proc, ports[key])
    # What the server generated is what the champion generates when loaded here.
    for key, call in (("t5", t5_call), ("mbart", mbart_call)):
        model = load_champion(mlflow_server.uri, names[key])
        local = model.predict(pd.DataFrame(call["dataframe_records"]), params=call["params"])
        assert served[key] == local.to_dict(orient="records"), key
    assert served["t5"][0]["generated"]
    # The source language reaches the model: the same text in fr_XX and en_XX differs (mBART
    # ends the input with the code and, denoising, starts the decoder from it).
    assert len(served["mbart"]) == 3 and all(r["generated"] for r in served["mbart"])
    assert served["mbart"][0] != served["mbart"][1]
