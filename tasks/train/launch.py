"""Data-parallel training: torchrun starts one `tasks.train.run` process per rank.

Why a launcher of our own around torchrun: the flow needs what torchrun leaves to a terminal.
Every rank's output reaches the flow's log with the rank in front (torchrun's line prefix); rank
0's progress lines feed the flow's progress artifact; and a rank that dies (OOM, a signal, an
exception) fails the run promptly with that rank named, its last lines quoted. torchrun runs with
`--max-restarts=0` (a restart would silently retrain from the last checkpoint) and stops the
other ranks when one fails; whatever is still alive when the launcher returns or raises is killed,
and each rank also exits when the launching process is gone (`tasks.train.ranks`), so no rank
outlives the flow run.

The spec (plan and parameter sections) goes to the ranks as JSON and is validated back there;
rank 0 writes the outcome the same way.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from pydantic import TypeAdapter

from tasks import REPO_ROOT
from tasks.params import ModelParams, TrainParams
from tasks.train.data import TrainingError
from tasks.train.outcome import TrainOutcome
from tasks.train.plan import TrainPlan
from tasks.train.ranks import LAUNCHER_PID_ENV

PROGRESS_RE = re.compile(r"^\[rank 0\] .*training progress: step (\d+)/\d+")
RANK_LINE_RE = re.compile(r"^\[rank (\d+)\] ?(.*)$")
STOP_GRACE_S = 20  # SIGTERM, then SIGKILL after this long


class RankFailedError(RuntimeError):
    """A training rank died; the message names it and quotes its last lines."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a rank needs, written by the launcher and validated back by each rank."""

    plan: TrainPlan
    model: ModelParams
    train: TrainParams
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None

    def write(self, path: Path) -> None:
        path.write_bytes(_SPEC.dump_json(self, indent=1))

    @classmethod
    def read(cls, path: Path) -> LaunchSpec:
        return _SPEC.validate_json(path.read_bytes())


_SPEC = TypeAdapter(LaunchSpec)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_processes(train: TrainParams, gpus: int) -> int:
    """`train.processes` as a number: `auto` is one per visible GPU (1 on CPU); checked."""
    on_gpu = train.device != "cpu" and gpus > 0
    if train.processes == "auto":
        processes = gpus if on_gpu else 1
    else:
        processes = train.processes
        if on_gpu and processes > gpus:
            raise TrainingError(
                f"train.processes={processes} but {gpus} GPU(s) are visible: use "
                "train.processes=auto (one per GPU), or give the run more GPUs (the docker-gpu "
                "pool's gpu_count follows train.processes when the pipeline starts it)"
            )
    if train.batch_size % processes:
        raise TrainingError(
            f"train.batch_size={train.batch_size} is the global batch and must divide evenly "
            f"over {processes} processes: use a multiple of {processes}"
        )
    return processes


def gpu_job_variables(train: TrainParams) -> dict[str, int]:
    """Job variables of a docker-gpu run, so the container has one GPU per process.

    With `train.processes=auto` the pool's default (every GPU) stands and auto then starts one
    process per GPU; a number asks the pool for that many GPUs.
    """
    return {} if train.processes == "auto" else {"gpu_count": train.processes}


def threads_per_process(processes: int) -> int:
    """CPU threads for each rank: the usable cores shared evenly (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // processes)


def torchrun_command(
    spec_path: Path, result_path: Path, processes: int, log_dir: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "--tee=3",
        f"--log-dir={log_dir}",
        "-m",
        "tasks.train.run",
        str(spec_path),
        str(result_path),
    ]


def launch_ranks(
    spec: LaunchSpec,
    *,
    processes: int,
    folder: Path,
    on_line: Callable[[str], None],
    on_step: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> TrainOutcome:
    """Run `spec` on `processes` ranks under torchrun; rank 0's outcome, or a clear error."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / "launch-spec.json", folder / "launch-result.json"
    spec.write(spec_path)
    result_path.unlink(missing_ok=True)
    threads = threads or threads_per_process(processes)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank ${rank}] ",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # Progress bars become a line per redraw in a log; Trainer's own log lines stay.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        LAUNCHER_PID_ENV: str(os.getpid()),
    }
    cmd = torchrun_command(spec_path, result_path, processes, folder / "torchrun-logs")
    on_line(f"data parallel: {processes} processes x {threads} thread(s): {' '.join(cmd)}")
    tails: dict[int, collections.deque[str]] = collections.defaultdict(
        lambda: collections.deque(maxlen=30)
    )
    output: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    tree: dict[int, float] = {}
    seen_at = 0.0
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            m = RANK_LINE_RE.match(line)
            if not (m.group(2) if m else line).strip():
                continue
            output.append(line)
            if m:
                tails[int(m.group(1))].append(m.group(2))
            if on_step is not None and (p := PROGRESS_RE.match(line)):
                on_step(int(p.group(1)))
            on_line(line)
            if time.monotonic() - seen_at > 1.0:
                seen_at = time.monotonic()
                tree.update(_descendants(proc.pid))
        proc.wait()
    finally:
        _stop(proc, tree)
    if proc.returncode != 0 or not result_path.is_file():
        raise failure(proc.returncode, list(output), tails)
    return TrainOutcome.read(result_path)


def failure(
    returncode: int, output: list[str], tails: dict[int, collections.deque[str]]
) -> Exception:
    """The error for a failed launch, from torchrun's root-cause summary and the rank's lines."""
    text = "\n".join(output)
    cause = text.split("Root Cause", 1)[1] if "Root Cause" in text else ""
    rank_m = re.search(r"rank\s*:\s*(\d+)", cause)
    if rank_m is None:
        last = " | ".join(output[-5:])
        return RankFailedError(f"torchrun exited with code {returncode}: {last}")
    rank = int(rank_m.group(1))
    code_m = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    code = int(code_m.group(1)) if code_m else None
    lines = list(tails.get(rank, ()))
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if code == 2 and errors:  # the rank's own TrainingError: the user's to fix
        return TrainingError(errors[-1])
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
    hint = (
        " SIGKILL is also what the kernel sends when memory runs out: if nobody killed it, lower"
        " train.batch_size or model.max_source_length."
        if code == -signal.SIGKILL
        else ""
    )
    last = " | ".join(lines[-3:]) or "no output"
    return RankFailedError(f"training rank {rank} failed ({how}); its last output: {last}.{hint}")


def _descendants(pid: int) -> dict[int, float]:
    """pid -> start time of every process under `pid` (to kill them later, safely by identity)."""
    try:
        return {p.pid: p.create_time() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _stop(proc: subprocess.Popen, tree: dict[int, float]) -> None:
    """Stop torchrun if it still runs (it stops its ranks), then kill any process left over."""
    if proc.poll() is None:
        tree.update(_descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, started in tree.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started:
                p.kill()
        except psutil.Error:
            pass
