"""Which exceptions are the user's to fix (printed plainly) and which are bugs (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    """True for errors whose message tells the user what to do."""
    from flows.params import SecretInParameterError
    from tasks.bronze import SourceError
    from tasks.storage import StorageError

    user_types: tuple[type[BaseException], ...] = (
        SourceError,
        StorageError,
        SecretInParameterError,
        FileNotFoundError,
    )
    try:
        from tasks.silver import SilverError

        user_types += (SilverError,)
    except ImportError:
        pass
    try:
        from tasks.training import TrainingError

        user_types += (TrainingError,)
    except ImportError:
        pass
    try:
        from tasks.tracking import TrackingError

        user_types += (TrackingError,)
    except ImportError:
        pass
    try:
        from tasks.infra import InfraError

        user_types += (InfraError,)
    except ImportError:
        pass
    return isinstance(exc, user_types)
