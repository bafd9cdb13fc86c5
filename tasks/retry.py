"""Retry settings for tasks that touch the network or storage."""

from prefect.tasks import exponential_backoff

from tasks.storage import StorageError


def _retry_on(task, task_run, state) -> bool:
    """Retry storage/network faults only: a bad input will not fix itself."""
    try:
        state.result()
    except (StorageError, ConnectionError, TimeoutError, OSError) as exc:
        return not isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError)
    except Exception:  # noqa: BLE001
        return False
    return False


STORAGE_RETRIES = {
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_on,
}
