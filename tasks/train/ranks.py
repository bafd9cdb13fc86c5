"""Which process of a data-parallel run this is, and the few places where ranks must wait.

torchrun starts every rank with RANK, WORLD_SIZE and LOCAL_WORLD_SIZE set; a run in the flow's
own process has none of them and is rank 0 of 1. The ranks share one machine's disk, so work
that writes shared files (downloading a checkpoint, the `datasets` cache) runs on rank 0 first
while the others wait, and then the others find it done. A rank also watches the process that
launched it: when the flow's process dies, no rank goes on training unseen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "LAKEHOUSE_LAUNCHER_PID"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init_process_group(cuda: bool) -> None:
    """Join the ranks now (gloo on CPU, nccl on GPUs); Trainer reuses the group later."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def destroy_process_group() -> None:
    """Leave the group before the interpreter exits.

    A rank that exits with its gloo group still open lets C++ destroy the group's threads at
    static tear-down; under load that aborts the process ("terminate called without an active
    exception", SIGABRT) after its work is done, and torchrun then fails the whole run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first; the other ranks run it after rank 0 has finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def watch_launcher(interval_s: float = 1.0) -> None:
    """Exit this rank when the launching (flow) process is gone (a daemon thread)."""
    pid = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.error("rank %d: the launching process %d is gone; stopping", rank(), pid)
                os._exit(3)
            except PermissionError:  # a pid reused by another user's process: also gone
                os._exit(3)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
