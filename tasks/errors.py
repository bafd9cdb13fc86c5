"""Which exceptions are the user's to fix (printed plainly) and which are bugs (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    """True for errors whose message tells the user what to do."""
    from flows.params import SecretInParameterError
    from tasks.bronze.ingest import SourceError
    from tasks.lakehouse.storage import StorageError

    user_types: tuple[type[BaseException], ...] = (
        SourceError,
        StorageError,
        SecretInParameterError,
        FileNotFoundError,
    )
    try:
        from tasks.silver.job import SilverError

        user_types += (SilverError,)
    except ImportError:
        pass
    try:
        from tasks.train.run import TrainingError

        user_types += (TrainingError,)
    except ImportError:
        pass
    try:
        from tasks.tracking.runs import TrackingError

        user_types += (TrackingError,)
    except ImportError:
        pass
    try:
        from tasks.pipeline.infra import InfraError

        user_types += (InfraError,)
    except ImportError:
        pass
    return isinstance(exc, user_types)
