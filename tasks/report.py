"""Reporting shared by every stage: artifact keys (artifacts and events are made in tasks.py)."""

from __future__ import annotations

import re


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]
