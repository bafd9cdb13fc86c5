"""Retry settings for tasks that touch the network or storage."""

import os

from prefect.tasks import exponential_backoff

from tasks.lakehouse.storage import StorageError


def _retry_on(task, task_run, state) -> bool:
    """Retry storage/network faults only: a bad input or wrong credentials will not fix itself."""
    try:
        state.result()
    except StorageError as exc:
        return exc.retryable
    except (ConnectionError, TimeoutError, OSError) as exc:
        return not isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError)
    except Exception:  # noqa: BLE001
        return False
    return False


class _ScaledDelays(list):
    """Backoff delays scaled by LAKEHOUSE_RETRY_DELAY_SCALE, read when a retry happens.

    Prefect computes the delay list when the task is decorated (import time); reading the scale
    lazily lets tests and impatient users shorten waits without re-importing.
    """

    def __getitem__(self, index):  # type: ignore[override]
        value = super().__getitem__(index)
        return value * float(os.environ.get("LAKEHOUSE_RETRY_DELAY_SCALE", "1"))


STORAGE_RETRIES = {
    "retries": 4,
    "retry_delay_seconds": _ScaledDelays(exponential_backoff(backoff_factor=2)(4)),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_on,
}
