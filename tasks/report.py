"""Reporting shared by every stage: artifact keys (artifacts and events are made in tasks.py)."""

from __future__ import annotations

import logging
import re


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def warn_in_run(logger: logging.Logger, msg: str, *args: object) -> None:
    """Warn in the Prefect run's log when inside a run (visible in the UI), else on `logger`.

    Plain modules call this instead of importing Prefect: the import happens only here, and
    only when a warning is due.
    """
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(msg, *args)
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        logger.warning(msg, *args)
