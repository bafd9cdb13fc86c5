"""MLflow tracking and registry against a real `mlflow server` (SQLite backend store).

One real Seq2SeqTrainer run (tiny T5, a few steps) feeds the metrics callback; its saved folder
is "the trained model" of every run here. Other runs reuse that folder with chosen eval_loss
values to exercise the registry's aliases (the champion rule itself, scored on the same held-out
rows: test_tracking_promotion.py and tests/unit/test_promotion.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows.params import PipelineParams, SecretInParameterError, TrackingParams, flatten
from tasks.tracking import registry, runs
from tasks.tracking.callback import MlflowMetricsCallback
from tasks.tracking.finish import finish_run
from tasks.tracking.server import TrackingError
from tasks.tracking.tasks import start_tracking, tracking_token

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "culturax"
PROMPTS = ["Le chat dort sur le canapé.", "The weather in Paris is nice today."]


def silver_manifests(root: Path) -> list[dict]:
    """Two silver manifests as the silver layer writes them (only the fields tracking reads)."""
    table = "silver/json/multi/tiny-t5"
    return [
        {
            "batch_id": f"s{i}",
            "layer": "silver",
            "dataset": "json",
            "language": "multi",
            "table": table,
            "rows": 10 + i,
            "parents": [f"b{i}"],
            "schema": {"_row_id": "string", "text": "string", "input_ids": "list<element: int32>"},
        }
        for i in (1, 2)
    ]


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory, mlflow_server):
    """A real tiny-T5 Trainer run logging through MlflowMetricsCallback; returns its ids."""
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_models["t5"])
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["t5"])
    texts = [
        json.loads(line)["text"][:200]
        for line in (SAMPLE / "fr.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    ]
    rows = [
        {
            "input_ids": tok(t, truncation=True, max_length=32)["input_ids"],
            "labels": tok(t, truncation=True, max_length=16)["input_ids"],
        }
        for t in texts
    ]
    out = tmp_path_factory.mktemp("trained")
    params = PipelineParams()
    run_id = runs.start_run(
        mlflow_server.uri,
        "tracking-tests",
        f"trained-{uuid.uuid4().hex[:8]}",
        {**flatten(params), "notes.long": "x" * 7000},
        {"objective": "span_corruption"},
        token=None,
    )
    callback = MlflowMetricsCallback(run_id, mlflow_server.uri)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "ckpt"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=rows[:16],
        eval_dataset=rows[16:],
        data_collator=DataCollatorForSeq2Seq(tok, model),
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    model_dir = out / "final"
    trainer.save_model(str(model_dir))
    return {
        "run_id": run_id,
        "model_dir": model_dir,
        "eval_loss": eval_loss,
        "out": out,
        "callback": callback,
        "params": params,
        "history": [dict(h) for h in trainer.state.log_history],
    }


# The training flow's final figures, as finish() hands them to finish_run.
THROUGHPUT = {"tokens_seen": 4096, "tokens_per_second": 512.5, "nonpad_fraction": 0.83, "mfu": 0.01}


def finish(
    server_uri: str, run_id: str, model_dir: Path, work: Path, eval_loss: float, **kwargs
) -> None:
    """finish_run as the training flow calls it (config and tokenizer come from the run)."""
    finish_run(
        run_id,
        server_uri,
        model_dir,
        {"eval_loss": eval_loss, **THROUGHPUT, "global_step": 4},
        kwargs.pop("artifacts", {}),
        silver_manifests(work),
        params={"train.extra_args.hub_token": "x"},
        lakehouse_root=str(work / "lake"),
        retry_for_s=kwargs.pop("retry_for_s", 20),
        **kwargs,
    )


def scored_run(server_uri: str, key: str, model_id: str, eval_loss: float) -> str:
    """A finished run with an eval_loss that points at an already logged model (cheap)."""
    from mlflow import MlflowClient

    run_id = runs.start_run(
        server_uri, "tracking-tests", key, {"train.max_steps": 4}, {"objective": "span_corruption"}
    )
    c = MlflowClient(tracking_uri=server_uri)
    c.log_metric(run_id, "eval_loss", eval_loss, step=4)
    c.set_tag(run_id, runs.MODEL_ID_TAG, model_id)
    c.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def finished(trained, mlflow_server):
    """The trained run, finished: model, lineage, dataset and artifacts logged."""
    finish(
        mlflow_server.uri,
        trained["run_id"],
        trained["model_dir"],
        trained["out"],
        trained["eval_loss"],
        metrics_callback=trained["callback"],
    )
    return trained


def client(server) -> object:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_run_tracks_params_metrics_lineage_and_artifacts(finished, mlflow_server):
    c = client(mlflow_server)
    run = c.get_run(finished["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == str(finished["params"].train.max_steps)
    assert params["tracking.token_secret"] == "mlflow-token"  # a block's name, not a secret
    assert "train.extra_args.hub_token" not in params  # secret by name: dropped
    assert len(params["notes.long"]) == 6000 and params["notes.long"].endswith("[truncated]")
    # Metrics by step through the callback: exactly what the Trainer itself logged.
    for key in ("loss", "grad_norm", "learning_rate"):
        expected = [(h["step"], pytest.approx(h[key])) for h in finished["history"] if key in h]
        got = sorted((m.step, m.value) for m in c.get_metric_history(finished["run_id"], key))
        assert len(expected) == 4 and got == expected, key
    evals = [h["step"] for h in finished["history"] if "eval_loss" in h]
    assert [m.step for m in c.get_metric_history(finished["run_id"], "eval_loss")][:2] == evals[:2]
    # The final throughput figures, once each, at the last step.
    for key, value in THROUGHPUT.items():
        got = [(m.step, m.value) for m in c.get_metric_history(finished["run_id"], key)]
        assert got == [(4, pytest.approx(value))], key
    tags = run.data.tags
    assert tags["git_sha"] and tags[runs.RUN_KEY_TAG].startswith("trained-")
    assert tags["lineage.silver.batch_ids"] == "s1,s2"
    assert tags["lineage.bronze.batch_ids"] == "b1,b2"
    assert tags["lineage.silver.uris"].endswith("silver/json/multi/tiny-t5/batch=s2")
    (ds,) = run.inputs.dataset_inputs
    # The digest of the silver batch ids (s1, s2), computed here from its definition.
    assert ds.dataset.digest == hashlib.sha256(b"s1\ns2").hexdigest()[:32]
    assert ds.dataset.name == "silver/json/multi"
    assert "input_ids" in ds.dataset.schema
    listed = {a.path for a in c.list_artifacts(finished["run_id"])}
    assert {"config", "tokenizer", "lineage", "plots"} <= listed
    assert [a.path for a in c.list_artifacts(finished["run_id"], "plots")] == [
        "plots/loss_curve.png"
    ]
    assert "tokenizer/tokenizer.json" in {
        a.path for a in c.list_artifacts(finished["run_id"], "tokenizer")
    }
    config = c.download_artifacts(
        finished["run_id"], "config/resolved_config.yaml", str(finished["out"])
    )
    resolved = yaml.safe_load(Path(config).read_text())
    assert resolved["train"]["max_steps"] == finished["params"].train.max_steps
    assert resolved["tracking"]["registered_model"] == finished["params"].tracking.registered_model
    model = c.get_logged_model(tags[runs.MODEL_ID_TAG])
    assert model.source_run_id == finished["run_id"]
    assert str(model.status) == "READY"


def test_start_run_reopens_the_run_of_a_resumed_training(finished, mlflow_server):
    key = finished["run_id"]
    c = client(mlflow_server)
    run_key = c.get_run(key).data.tags[runs.RUN_KEY_TAG]
    again = runs.start_run(
        mlflow_server.uri,
        "tracking-tests",
        run_key,
        {"train.max_steps": 999, "train.new_param": 1},
        {},
    )
    assert again == key
    run = c.get_run(key)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.new_param"] == "1"
    assert run.data.tags["lakehouse.params_changed"] == "train.max_steps"
    c.set_terminated(key, "FINISHED")


def test_register_is_idempotent_with_tags_and_aliases(finished, mlflow_server):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    tags = {"objective": "span_corruption", "language": "multi", "dataset": "json"}
    got = registry.register_model(finished["run_id"], mlflow_server.uri, name, tags)
    assert got == (name, "1")
    assert registry.register_model(finished["run_id"], mlflow_server.uri, name, tags) == got
    c = client(mlflow_server)
    versions = c.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.run_id == finished["run_id"]
    assert {k: mv.tags[k] for k in tags} == tags
    assert mv.tags["base_model"] == finished["params"].model.name_or_path  # from the run params
    assert float(mv.tags["metric.eval_loss"]) == pytest.approx(finished["eval_loss"], rel=1e-4)
    assert sorted(c.get_registered_model(name).aliases) == ["candidate", "champion"]


def test_registering_never_moves_champion_only_a_won_comparison_does(finished, mlflow_server):
    uri, name = mlflow_server.uri, f"champ-{uuid.uuid4().hex[:6]}"
    c = client(mlflow_server)
    model_id = c.get_run(finished["run_id"]).data.tags[runs.MODEL_ID_TAG]
    first = scored_run(uri, f"c1-{name}", model_id, eval_loss=2.0)
    worse = scored_run(uri, f"c2-{name}", model_id, eval_loss=2.5)
    better = scored_run(uri, f"c3-{name}", model_id, eval_loss=1.5)

    def aliases() -> dict[str, str]:
        return {a: c.get_model_version_by_alias(name, a).run_id for a in ("candidate", "champion")}

    registry.register_model(first, uri, name, {})
    assert aliases() == {"candidate": first, "champion": first}  # the first is champion
    registry.register_model(worse, uri, name, {})
    assert aliases() == {"candidate": worse, "champion": first}
    # A lower eval_loss on its own eval rows is not a comparison: registering does not promote.
    _, version = registry.register_model(better, uri, name, {})
    assert aliases() == {"candidate": better, "champion": first}
    # The comparison on the same rows (tasks.tracking.promotion) decides; the registry records
    # it on the version and moves the alias only when it promotes.
    registry.record_promotion(
        uri, name, version, tags={"promotion.decision": "kept"}, description="kept", promote=False
    )
    assert aliases() == {"candidate": better, "champion": first}
    registry.record_promotion(
        uri,
        name,
        version,
        tags={"promotion.decision": "promoted"},
        description="card",
        promote=True,
    )
    assert aliases() == {"candidate": better, "champion": better}
    mv = c.get_model_version(name, version)
    assert (mv.tags["promotion.decision"], mv.description) == ("promoted", "card")
    # Re-registering the older run does not move `candidate` back: it names the newest version.
    registry.register_model(worse, uri, name, {})
    assert aliases() == {"candidate": better, "champion": better}
    assert len(c.search_model_versions(f"name = '{name}'")) == 3


def test_champion_loads_and_generates_in_a_fresh_process(finished, mlflow_server, tmp_path):
    name = f"fresh-{uuid.uuid4().hex[:6]}"
    registry.register_model(finished["run_id"], mlflow_server.uri, name, {})
    # A clean interpreter: `-S` runs no .pth file, so site-packages (appended by hand) has the
    # libraries but not this project's editable install; no PYTHONPATH, outside the repository.
    # The model must carry its own code.
    code = (
        f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "import importlib.util\n"
        "hidden = [p for p in ('tasks', 'flows', 'blocks') if importlib.util.find_spec(p)]\n"
        "assert not hidden, f'project packages importable: {hidden}'\n"
        "import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({mlflow_server.uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        f"out = m.predict(pd.DataFrame({{'text': {PROMPTS!r}}}), params={{'max_new_tokens': 8}})\n"
        "print(json.dumps(out['generated'].tolist()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    generated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert generated == expected_generation(finished["model_dir"], PROMPTS, max_new_tokens=8)


def expected_generation(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy generation straight from the saved Hugging Face folder, decoded as the pyfunc
    wrapper promises: sentinels stay (span-corruption fills are readable); pad/eos/language
    codes go."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    ids = model.generate(
        **tok(prompts, return_tensors="pt", padding=True), max_new_tokens=max_new_tokens
    )
    assert ids.shape[1] > 1  # it generated tokens, not only the start token
    sentinels = {i for t, i in tok.get_vocab().items() if t.startswith("<extra_id_")}
    drop = set(tok.all_special_ids) - sentinels
    return [
        tok.decode([i for i in row if i not in drop], skip_special_tokens=False).strip()
        for row in ids.tolist()
    ]


def test_server_down_then_back_registers_once(finished, mlflow_server, tmp_path, caplog):
    uri, name = mlflow_server.uri, f"outage-{uuid.uuid4().hex[:6]}"
    md, logged = finished["model_dir"], finished["run_id"]
    unfinished = runs.start_run(uri, "tracking-tests", f"o2-{name}", {}, {})
    callback = MlflowMetricsCallback(unfinished, uri, final_retry_s=0)
    mlflow_server.stop()
    restarter = None
    try:
        # Training goes on while MLflow is down: the callback keeps points, never raises.
        t0 = time.monotonic()
        callback.add({"loss": 1.0}, 1)
        assert callback.flush() is False and len(callback.pending) == 1
        assert time.monotonic() - t0 < 60  # not MLflow's own ~4 minutes of retries
        with pytest.raises(TrackingError, match="kept at .*final.*re-run"):
            finish(uri, unfinished, md, tmp_path, 3.0, retry_for_s=1)
        with pytest.raises(TrackingError, match="kept at .*final.*re-run the same"):
            registry.register_model(logged, uri, name, {}, model_dir=md, retry_for_s=1)
        # The server comes back while registration retries.
        restarter = threading.Timer(1.0, mlflow_server.start)
        restarter.start()
        caplog.set_level(logging.WARNING, logger="tasks.tracking.server")
        got = registry.register_model(logged, uri, name, {}, model_dir=md, retry_for_s=180)
        assert any("unreachable" in r.message for r in caplog.records)
    finally:
        if restarter is not None:
            restarter.join()
        mlflow_server.start()
    assert got == (name, "1")
    assert registry.register_model(logged, uri, name, {}) == got  # a re-run: no second version
    c = client(mlflow_server)
    assert len(c.search_model_versions(f"name = '{name}'")) == 1
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    assert callback.flush() and callback.pending == []
    assert [m.step for m in c.get_metric_history(unfinished, "loss")] == [1]


def test_no_secret_reaches_params_tags_artifacts_or_logs(
    finished, mlflow_server, prefect_harness, tmp_path, caplog, capfd, monkeypatch
):
    from prefect.blocks.system import Secret

    canary = f"canary{uuid.uuid4().hex}"
    block = f"mlflow-token-{uuid.uuid4().hex[:6]}"
    Secret(value=canary).save(block, overwrite=True)
    # setenv first: delenv of an unset variable records nothing to undo, and the code under test
    # sets MLFLOW_TRACKING_TOKEN to the canary; this way it is removed again when the test ends.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    caplog.set_level(logging.DEBUG)
    uri, md = mlflow_server.uri, finished["model_dir"]
    key = f"canary-{uuid.uuid4().hex[:6]}"
    # The tracking tasks read the token from its block and pass the value down.
    token = tracking_token(TrackingParams(uri=uri, token_secret=block))
    # The secret's value in an ordinary field is refused, like a connection string.
    with pytest.raises(SecretInParameterError, match="model.name_or_path"):
        runs.start_run(uri, "tracking-tests", key, {"model.name_or_path": canary}, {}, token=token)
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == canary  # sent to the server, never logged
    with pytest.raises(SecretInParameterError, match="note"):
        runs.start_run(uri, "tracking-tests", key, {}, {"note": f"x {canary}"}, token=token)
    with pytest.raises(SecretInParameterError):
        runs.start_run(
            uri,
            "tracking-tests",
            key,
            {"lakehouse.root": "DefaultEndpointsProtocol=https;AccountKey=abc"},
            {},
        )
    run_id = runs.start_run(
        uri,
        "tracking-tests",
        key,
        {**flatten(PipelineParams()), "train.extra_args.hub_token": canary},
        {},
        token=token,
    )
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "notes.yaml").write_text(f"token: {canary}\n")
    finish_run(
        run_id,
        uri,
        md,
        {"eval_loss": 2.0},
        {"leaky": leaky},
        silver_manifests(tmp_path),
        params={"p.mlflow_token": canary, "p.ok": 1},
        lineage_tags={"lineage.extra": canary},
        token=token,
        retry_for_s=20,
    )
    registry.register_model(run_id, uri, f"canary-{key}", {"note": canary}, token=token)
    c = client(mlflow_server)
    run = c.get_run(run_id)
    assert run.data.params["p.ok"] == "1" and "config" in {
        a.path for a in c.list_artifacts(run_id)
    }  # the checks below can see a leak
    assert "leaky" not in {a.path for a in c.list_artifacts(run_id)}
    found = []
    for path in [*mlflow_server.folder.rglob("*")]:
        if path.is_file() and canary.encode() in path.read_bytes():
            found.append(str(path))
    assert not found, f"canary found in the MLflow store: {found}"
    out, err = capfd.readouterr()
    assert canary not in caplog.text and canary not in out and canary not in err


def test_run_is_linked_to_the_prefect_flow_run(mlflow_server, prefect_harness):
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="tracking-link-test")
    def linked(uri: str) -> tuple[str, str]:
        tracking = TrackingParams(uri=uri, experiment="tracking-tests", token_secret=None)
        run_key = f"link-{uuid.uuid4().hex[:6]}"
        run_id = start_tracking(tracking=tracking, run_key=run_key, params={}, tags={})
        return run_id, str(flow_run.id)

    run_id, flow_run_id = linked(mlflow_server.uri)
    tags = client(mlflow_server).get_run(run_id).data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.flow_name"] == "tracking-link-test"
    assert tags["prefect.flow_run_ids"] == flow_run_id
    assert tags["prefect.flow_run_url"].endswith(f"/flow-runs/flow-run/{flow_run_id}")
    assert tags["mlflow.source.git.commit"] == tags["git_sha"]
