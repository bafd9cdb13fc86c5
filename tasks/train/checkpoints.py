"""Checkpoints that survive a kill: a completion marker written last, verified before resuming.

Trainer writes a checkpoint as many files, and a kill can stop it anywhere; it cannot tell a torn
checkpoint from a good one. So a checkpoint counts only once `_COMPLETE` (the files and their
sizes) is written after every file (after the upload, on an Azure lakehouse), and a resume first
verifies the newest marked one (sizes, trainer state, weights that load, optimizer files),
falling back to an older one. In data-parallel training only rank 0 marks and uploads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from tasks.lakehouse.storage import Lakehouse
from tasks.train.outcome import TrainOutcome

log = logging.getLogger(__name__)


COMPLETE = "_COMPLETE"
# Files of a run's output folder beside its checkpoints.
FINAL = "final"
RESULT_FILE = "train_result.json"
METER_FILE = "token_meter.json"
LOSS_CURVE = "loss_curve.png"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def verify_checkpoint(folder: Path, step: int | None = None) -> str | None:
    """Why the local checkpoint cannot be resumed from, or None when it is sound."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "no _COMPLETE marker (half-written)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable _COMPLETE marker"
    actual = file_sizes(folder)
    for name, size in expected.items():
        if actual.get(name) != size:
            return f"{name} missing or of a different size than when it was written"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json missing or not JSON"
    if step is not None and state.get("global_step") != step:
        return f"trainer_state.json says step {state.get('global_step')}, folder says {step}"
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        return "no model weights"
    for w in weights:
        if w.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(w), "pt") as fh:
                    fh.keys()
            except Exception as exc:  # noqa: BLE001 - any parse failure means corrupt
                return f"{w.name} does not load ({type(exc).__name__})"
    if not (folder / "optimizer.pt").is_file() or not (folder / "scheduler.pt").is_file():
        return "optimizer or scheduler state missing"
    return None


class CheckpointStore:
    """Checkpoints of one run: a local folder Trainer writes, mirrored to the lakehouse if remote.

    Local lakehouse: Trainer writes into the lakehouse folder itself and the marker goes next to
    the files. az:// lakehouse: Trainer writes into `.work/train/<run>`; each complete checkpoint
    is uploaded file by file, the marker last.
    """

    def __init__(
        self, local_dir: Path, lake: Lakehouse | None = None, remote_rel: str | None = None
    ):
        self.local_dir = Path(local_dir)
        self.lake = lake if remote_rel is not None else None
        self.remote_rel = remote_rel

    @property
    def uri(self) -> str:
        return self.lake.uri(self.remote_rel) if self.lake else str(self.local_dir)

    def mark_complete(self, folder: Path) -> None:
        """Write the marker (file sizes) after every file; upload first when remote."""
        marker = json.dumps({"files": file_sizes(folder), "completed_at": time.time()})
        if self.lake is not None:
            rel = f"{self.remote_rel}/{folder.name}"
            for name in file_sizes(folder):
                self.lake.put_file(folder / name, f"{rel}/{name}")
            self.lake.write_bytes(f"{rel}/{COMPLETE}", marker.encode())
        tmp = folder / f".{COMPLETE}.tmp"
        tmp.write_text(marker)
        os.replace(tmp, folder / COMPLETE)

    def prune_remote(self) -> None:
        """Drop remote checkpoints that Trainer rotated away locally."""
        if self.lake is None:
            return
        keep = {p.name for p in self.local_dir.glob("checkpoint-*")}
        for name in self.lake.listdir(self.remote_rel):
            if checkpoint_step(name) is not None and name not in keep:
                self.lake.rm(f"{self.remote_rel}/{name}")

    def steps(self) -> list[int]:
        """Checkpoint steps with a complete marker, newest first (remote when remote)."""
        if self.lake is not None:
            names = [
                n
                for n in self.lake.listdir(self.remote_rel)
                if checkpoint_step(n) is not None
                and self.lake.exists(f"{self.remote_rel}/{n}/{COMPLETE}")
            ]
        else:
            names = [
                p.name for p in self.local_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()
            ]
        return sorted((checkpoint_step(n) for n in names), reverse=True)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, local (downloaded first if remote)."""
        for step in self.steps():
            folder = self.local_dir / f"checkpoint-{step}"
            if self.lake is not None and verify_checkpoint(folder, step) is not None:
                self._download(f"{self.remote_rel}/checkpoint-{step}", folder)
            problem = verify_checkpoint(folder, step)
            if problem is None:
                return folder
            log.warning("checkpoint %s/checkpoint-%d skipped: %s", self.uri, step, problem)
        return None

    def clean_after(self, step: int | None) -> None:
        """Remove checkpoints that are half-written or newer than the one we resume from."""
        for p in self.local_dir.glob("checkpoint-*"):
            s = checkpoint_step(p.name)
            if s is not None and (step is None or s > step or verify_checkpoint(p, s)):
                shutil.rmtree(p, ignore_errors=True)
        if self.lake is not None:
            for name in self.lake.listdir(self.remote_rel):
                s = checkpoint_step(name)
                if s is not None and (step is None or s > step):
                    self.lake.rm(f"{self.remote_rel}/{name}")

    def final_model(self) -> Path | None:
        """The finished run's final model as a local folder, downloaded when only remote."""
        folder = self.local_dir / FINAL
        if (folder / COMPLETE).is_file():
            return folder
        if self.lake is None:
            return None
        self._download(f"{self.remote_rel}/{FINAL}", folder)
        return folder

    def _download(self, rel: str, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        marker = json.loads(self.lake.read_bytes(f"{rel}/{COMPLETE}"))
        for name in marker.get("files", {}):
            self.lake.get_file(f"{rel}/{name}", folder / name)
        (folder / COMPLETE).write_text(json.dumps(marker))

    def publish(self, local: Path, rel_name: str) -> str:
        """Upload a finished file or folder (final model, curve, result); returns its URI."""
        if self.lake is None:
            return str(local)
        dest = f"{self.remote_rel}/{rel_name}"
        if local.is_dir():
            for name in file_sizes(local):
                self.lake.put_file(local / name, f"{dest}/{name}")
            if (local / COMPLETE).is_file():
                self.lake.put_file(local / COMPLETE, f"{dest}/{COMPLETE}")
        else:
            self.lake.put_file(local, dest)
        return self.lake.uri(dest)

    def finished_result(self) -> TrainOutcome | None:
        """The stored outcome of a run that already finished (final model complete)."""
        try:
            if self.lake is not None:
                if not self.lake.exists(f"{self.remote_rel}/{FINAL}/{COMPLETE}"):
                    return None
                return TrainOutcome.from_json(
                    self.lake.read_bytes(f"{self.remote_rel}/{RESULT_FILE}")
                )
            if not (self.local_dir / FINAL / COMPLETE).is_file():
                return None
            return TrainOutcome.read(self.local_dir / RESULT_FILE)
        except (FileNotFoundError, ValueError):
            return None
