"""The project's code version (git SHA), recorded with runs and commits."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache

from tasks import REPO_ROOT


@lru_cache(maxsize=1)
def code_version() -> str:
    """Git SHA of the project (or the package version when not in a checkout)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git in the image: fall back to the package version
        if os.environ.get("GIT_SHA"):
            return os.environ["GIT_SHA"]
        try:
            from importlib.metadata import version

            return version("lakehouse-seq2seq")
        except Exception:  # noqa: BLE001
            return "unknown"
