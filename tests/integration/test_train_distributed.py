"""Data-parallel training in real processes on CPU (torchrun, gloo): the same model as one
process, one MLflow run and version, resume after a kill, and a dead rank failing the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
from tasks.train.checkpoints import COMPLETE, checkpoint_step
from tasks.train.data import TrainingError
from tasks.train.launch import LaunchSpec, launch_ranks, resolve_processes
from tasks.train.objectives import objective_lengths
from tests.conftest import ROOT, last_json
from tests.fixtures.training import sample_pairs, sample_texts, write_silver

COMPLETE_RE = re.compile(r"\[rank (\d+)\] .*checkpoint checkpoint-(\d+) complete")


def _no_dropout(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (out / "config.json").write_text(json.dumps(config))
    return out


def _final_weights(outcome) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(outcome.final_model_dir) / "model.safetensors"))


def _losses(outcome) -> list[float]:
    history = json.loads(Path(outcome.log_history_path).read_text())
    return [h["loss"] for h in history if "loss" in h]


def test_two_processes_train_the_same_model_as_one_with_the_global_batch(tmp_path, tiny_models):
    """Supervised, dropout off: 2 processes x 4 rows and 1 process x 8 rows per step."""
    import torch

    from tasks.train.plan import build_train_plan
    from tasks.train.run import fit_model

    model_dir = _no_dropout(tiny_models["t5"], tmp_path / "t5-no-dropout")
    root = str(tmp_path / "lake")
    write_silver(root, model_dir, sample_pairs(240))
    model = ModelParams(name_or_path=str(model_dir), max_source_length=40, max_target_length=40)
    outcomes = {}
    for processes in (1, 2):
        train = TrainParams(
            objective="supervised",
            max_steps=6,
            batch_size=8,  # global: 8 rows per step, 8 / processes on each
            learning_rate=3e-3,
            logging_steps=1,
            save_steps=100,
            eval_steps=100,
            max_eval_samples=4,
            generation_max_length=4,
            device="cpu",
            resume="never",
            processes=processes,
            output_dir=str(tmp_path / f"out-{processes}"),
        )
        plan = build_train_plan(
            lakehouse=LakehouseParams(root=root),
            source=SourceParams(dataset="json", language="multi"),
            model=model,
            train=train,
        )
        if processes == 1:
            outcomes[1] = fit_model(plan=plan, model=model, train=train)
        else:
            outcomes[2] = launch_ranks(
                LaunchSpec(plan=plan, model=model, train=train),
                processes=2,
                folder=tmp_path / "launch",
                on_line=print,
            )
    assert outcomes[2].metrics["processes"] == 2 and outcomes[1].metrics["processes"] == 1
    # The same rows in every step (the sampler orders global batches) and the same tokens.
    assert outcomes[2].tokens_seen == outcomes[1].tokens_seen
    assert _losses(outcomes[2]) == pytest.approx(_losses(outcomes[1]), rel=1e-4)
    one, two = _final_weights(outcomes[1]), _final_weights(outcomes[2])
    assert one.keys() == two.keys()
    moved = max(float((one[k] - _initial(model_dir)[k]).abs().max()) for k in one)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved > 1e-3  # training changed the weights ...
    assert worst < 1e-4, f"parameters differ by up to {worst} (training moved them {moved})"
    assert all(torch.isfinite(t).all() for t in two.values())


def _initial(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------- through the flow

STEPS, SAVE, BATCH, SOURCE, TARGET = 30, 5, 4, 32, 8


def _flow_cmd(tmp_path: Path, root: Path, model_dir: Path) -> list[str]:
    settings = {
        "lakehouse.root": root,
        "model.name_or_path": model_dir,
        "model.max_source_length": SOURCE,
        "model.max_target_length": TARGET,
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment": "ddp",
        "tracking.registered_model": "ddp-model",
        "train.processes": 2,
        "train.device": "cpu",
        "train.max_steps": STEPS,
        "train.save_steps": SAVE,
        "train.eval_steps": 100,
        "train.batch_size": BATCH,
        "train.logging_steps": 1,
        "train.max_eval_samples": 8,
    }
    sets = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "flows", "train", "--json", *sets]


@pytest.fixture
def start_flow(tmp_path):
    """Start `python -m flows train` logging to a file; whatever it started dies with the test."""
    started: list[psutil.Process] = []

    def start(cmd: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "LAKEHOUSE_WORK_DIR": str(tmp_path / "work")}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(psutil.Process(proc.pid))
        return proc

    yield start
    for parent in started:  # a failed assertion must not leave a training behind
        try:
            tree = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training ranks under the flow process, by RANK."""
    found = {}
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = p.environ().get("RANK")  # torchrun itself has none
                if rank is not None and "tasks.train.run" in " ".join(p.cmdline()):
                    found[int(rank)] = p
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return found


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"flow exited before {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout}s:\n{log.read_text()[-4000:]}")


def _gone(processes: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    """Those of `processes` still alive after `timeout` (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.2)
    return alive


def _completed(models: Path) -> list[int]:
    return sorted(checkpoint_step(p.parent.name) for p in models.glob(f"*/checkpoint-*/{COMPLETE}"))


def _checkpoint_lines(text: str) -> list[tuple[int, int]]:
    """(rank, step) of every 'checkpoint-N complete' line of a run's output."""
    return [
        (int(m.group(1)), int(m.group(2)))
        for line in text.splitlines()
        if (m := COMPLETE_RE.search(line))
    ]


def test_a_killed_rank_fails_the_flow_run_promptly_and_the_rerun_resumes(
    tmp_path, tiny_models, prefect_harness, start_flow
):
    """2 CPU ranks through `python -m flows train`: SIGKILL rank 1 mid-run; the run fails within
    a minute naming it, nothing is left running; the re-run resumes from the last complete
    checkpoint; one MLflow run, one model version, each checkpoint written once, by rank 0."""
    import torch
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    root = tmp_path / "lake"
    write_silver(str(root), tiny_models["t5"], sample_texts(per_language=40))
    cmd = _flow_cmd(tmp_path, root, tiny_models["t5"])
    models = root / "models"
    first_log = tmp_path / "first.log"
    proc = start_flow(cmd, first_log)
    ranks = _wait_for(lambda: len(r := _ranks(proc)) == 2 and r, 300, "ranks", proc, first_log)
    _wait_for(lambda: max(_completed(models), default=0) >= 2 * SAVE, 300, "ckpt", proc, first_log)
    # Rank 0 is then left waiting for rank 1 in a collective: the launcher must not hang there.
    everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert proc.wait(120) != 0
    assert time.monotonic() - killed < 60, "the run did not fail within a minute"
    assert _gone(everything) == [], "processes left behind"
    first = first_log.read_text()
    assert "training rank 1 failed (killed by SIGKILL)" in first
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    assert flow_run.state.is_failed()
    assert "training rank 1 failed (killed by SIGKILL)" in flow_run.state.message
    last = max(_completed(models))
    assert last < STEPS, "the run finished before the kill; nothing to resume"
    run_dir = next(models.iterdir())

    again_log = tmp_path / "again.log"
    rerun = start_flow(cmd, again_log)
    assert rerun.wait(600) == 0, again_log.read_text()[-4000:]
    text = again_log.read_text()
    result = last_json(text)
    assert result["global_step"] == STEPS and result["resumed_from_step"] == last

    # Evidence outside the result: the steps the re-run executed, from its own log lines ...
    steps = [int(m) for m in re.findall(r"\[rank 0\] .*training progress: step (\d+)/", text)]
    assert steps[0] == last and steps[-1] == STEPS
    losses = re.findall(r"\[rank 0\] \{'loss': ", text)
    assert len(losses) == STEPS - last  # one per executed step (logging_steps=1), none before
    # ... and Adam's own step counter (a fresh optimizer would count only the re-run's steps)
    # and the scheduler's, continued from the checkpoint's.
    final = run_dir / f"checkpoint-{STEPS}"
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {STEPS}
    assert torch.load(final / "scheduler.pt", weights_only=True)["last_epoch"] == STEPS

    # Each checkpoint written once, by rank 0 (the first run's line for its last checkpoint may
    # be lost with the kill); ranks' logs reach the flow's log with their rank.
    before, after = _checkpoint_lines(first), _checkpoint_lines(text)
    assert {rank for rank, _ in before + after} == {0}
    assert [step for _, step in after] == list(range(last + SAVE, STEPS + 1, SAVE))
    assert set(step for _, step in before) <= set(range(SAVE, last + 1, SAVE))
    assert len(before) == len({step for _, step in before})
    assert re.search(r"\[rank 1\] .*process 1 of 2", text)

    # One MLflow run and one model version; per-step token counts summed over both ranks.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the process-wide registry
    experiment = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result["mlflow_run_id"]
    assert len(client.search_model_versions("name='ddp-model'")) == 1
    tokens = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens_seen")}
    lengths = objective_lengths("span_corruption", SOURCE, TARGET)
    per_step = BATCH * (lengths.input_length + lengths.target_length)  # no padding
    assert tokens and all(value == step * per_step for step, value in tokens.items())


def test_docker_gpu_pool_gives_one_gpu_per_process():
    """The rendered docker-gpu job asks for train.processes GPUs (all of them for auto)."""
    import asyncio

    from prefect_docker.worker import DockerWorkerJobConfiguration

    from deployments.deploy import load_template
    from tasks.train.launch import gpu_job_variables

    def gpus_requested(train: TrainParams) -> int:
        # A non-local API URL keeps prefect-docker from asking an API or engine for anything.
        env = {"PREFECT_API_URL": "http://prefect.example:4200/api"}
        values = {**gpu_job_variables(train), "env": env}
        template = load_template("docker-gpu")
        render = DockerWorkerJobConfiguration.from_template_and_values
        config = asyncio.run(render(template, values))
        (request,) = config.container_create_kwargs["device_requests"]
        return request["count"]

    assert gpus_requested(TrainParams(processes=2)) == 2
    assert gpus_requested(TrainParams(processes="auto")) == -1  # every GPU, one process each
    # In the container: auto is one process per visible GPU; more processes than GPUs, or a
    # global batch that does not split evenly, is refused before anything starts.
    assert resolve_processes(TrainParams(processes="auto"), gpus=4) == 4
    assert resolve_processes(TrainParams(processes="auto", device="cpu"), gpus=4) == 1
    assert resolve_processes(TrainParams(processes="auto"), gpus=0) == 1
    with pytest.raises(TrainingError, match="train.processes=4 but 2 GPU.*gpu_count"):
        resolve_processes(TrainParams(processes=4), gpus=2)
    with pytest.raises(TrainingError, match="batch_size=6 is the global batch.*multiple of 4"):
        resolve_processes(TrainParams(processes="auto", batch_size=6), gpus=4)
