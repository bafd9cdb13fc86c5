"""Reading a Prefect Secret block by name (HF token, MLflow token): the value never travels."""

from __future__ import annotations

from prefect.blocks.system import Secret


def load_secret(name: str | None) -> str | None:
    """Value of a Prefect Secret block, or None when unnamed or not created."""
    if not name:
        return None
    try:
        return Secret.load(name).get()
    except (ValueError, KeyError):
        return None
