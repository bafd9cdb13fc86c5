"""Kill a training run mid-way, re-run it: it resumes from the last complete checkpoint."""

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

from tasks.train.checkpoints import COMPLETE, checkpoint_step
from tests.conftest import ROOT, last_json
from tests.fixtures.training import sample_texts, write_silver

ARGS = [
    "--set",
    "train.max_steps=40",
    "--set",
    "train.save_steps=5",
    "--set",
    "train.eval_steps=20",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.logging_steps=1",
    "--set",
    "model.max_source_length=32",
    "--set",
    "model.max_target_length=8",
    "--set",
    "train.device=cpu",
    "--set",
    "train.max_eval_samples=8",
]


def _complete_steps(models: Path) -> list[int]:
    return sorted(checkpoint_step(p.parent.name) for p in models.glob(f"*/checkpoint-*/{COMPLETE}"))


def test_killed_training_resumes_from_last_complete_checkpoint(
    tmp_path, tiny_models, prefect_harness
):
    import torch

    root = tmp_path / "lake"
    write_silver(str(root), tiny_models["t5"], sample_texts(per_language=40))
    cmd = [
        sys.executable,
        "-m",
        "flows",
        "train",
        "--json",
        "--set",
        f"lakehouse.root={root}",
        "--set",
        f"model.name_or_path={tiny_models['t5']}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        *ARGS,
    ]
    env = {**os.environ, "LAKEHOUSE_WORK_DIR": str(tmp_path / "work")}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    models = root / "models"
    deadline = time.time() + 300
    while time.time() < deadline and not _complete_steps(models) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: no clean shutdown
    proc.wait(30)
    done = _complete_steps(models)
    assert done, f"no checkpoint before the kill:\n{proc.stdout.read().decode()[-3000:]}"
    last = max(done)
    assert last < 40, "the run finished before the kill; nothing to resume"
    run_dir = next(models.iterdir())
    assert not (run_dir / "final" / COMPLETE).exists()
    # A checkpoint torn by the kill (files but no marker) must never be picked.
    torn = run_dir / f"checkpoint-{last + 5}"
    if not torn.exists():
        shutil.copytree(run_dir / f"checkpoint-{last}", torn)
        (torn / COMPLETE).unlink()
        (torn / "trainer_state.json").write_text('{"global_step": ')

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = last_json(rerun.stdout)
    assert result["global_step"] == 40
    assert result["resumed_from_step"] == last
    assert result["checkpoint_uri"].endswith("checkpoint-40")
    assert (run_dir / "final" / COMPLETE).is_file()
    assert result["tokens_seen"] > 0 and result["nonpad_fraction"] == 1.0
    state = json.loads((run_dir / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    # Evidence outside the result that it resumed rather than restarted: Trainer's own log
    # lines (logging_steps=1) show the re-run executed only the steps after the checkpoint ...
    assert len(re.findall(r"^\{'loss': ", rerun.stdout, flags=re.M)) == 40 - last
    # ... with Adam's step counter and the scheduler's loaded from it (a fresh optimizer would
    # count only the re-run's 40 - last steps).
    optimizer = torch.load(run_dir / "checkpoint-40" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {40}
    scheduler = torch.load(run_dir / "checkpoint-40" / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == 40
    # Once finished, a re-run does nothing and says so.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained" in last_json(again.stdout)["message"]


def test_azure_checkpoints_resume_on_another_machine(tmp_path, tiny_models, azure_lakehouse):
    """Checkpoints go to az:// with a marker last; a fresh work dir resumes from there."""
    from tasks.lakehouse.storage import open_lakehouse
    from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
    from tasks.train.plan import build_train_plan
    from tasks.train.run import fit_model

    root, block = azure_lakehouse["root"], azure_lakehouse["block"]
    write_silver(root, tiny_models["t5"], sample_texts(per_language=20), block=block)
    model = ModelParams(
        name_or_path=str(tiny_models["t5"]), max_source_length=32, max_target_length=8
    )
    train = TrainParams(
        max_steps=6, save_steps=3, eval_steps=100, batch_size=4, device="cpu", max_eval_samples=8
    )
    sections = {
        "lakehouse": LakehouseParams(root=root, block=block),
        "source": SourceParams(dataset="json", language="multi"),
        "model": model,
        "train": train,
    }
    os.environ["LAKEHOUSE_WORK_DIR"] = str(tmp_path / "work-a")
    try:
        plan = build_train_plan(**sections)
        first = fit_model(plan=plan, model=model, train=train)
        assert first.global_step == 6 and first.resumed_from_step is None
        lake = open_lakehouse(root, block)
        rel = plan.remote_rel
        assert lake.exists(f"{rel}/checkpoint-3/{COMPLETE}")
        assert lake.exists(f"{rel}/final/{COMPLETE}")
        # Crash state: step 6 was being uploaded (no marker), nothing final yet.
        lake.rm(f"{rel}/checkpoint-6/{COMPLETE}")
        lake.rm(f"{rel}/final")
        lake.rm(f"{rel}/train_result.json")
        os.environ["LAKEHOUSE_WORK_DIR"] = str(tmp_path / "work-b")  # another machine
        plan = build_train_plan(**sections)
        second = fit_model(plan=plan, model=model, train=train)
        assert second.resumed_from_step == 3
        assert second.global_step == 6
        assert lake.exists(f"{rel}/checkpoint-6/{COMPLETE}")
        assert lake.exists(f"{rel}/final/model.safetensors")
    finally:
        os.environ.pop("LAKEHOUSE_WORK_DIR", None)
