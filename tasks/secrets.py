"""Credential rules: what may never travel as a parameter, a log line or an MLflow param."""

from __future__ import annotations

import re
from typing import Any

from tasks.errors import UserError

# Things that must never travel as a parameter (they would land in the Prefect DB, logs and
# MLflow params). Credentials belong in blocks.
_SECRET_PATTERNS = [
    re.compile(r"AccountKey=", re.I),
    re.compile(r"SharedAccessSignature=", re.I),
    re.compile(r"DefaultEndpointsProtocol=", re.I),
    re.compile(r"(^|[?&])sig=[^&]{10,}", re.I),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@host
    re.compile(r";\s*token=", re.I),  # Spark/Databricks Connect URL with a token
]


class SecretInParameterError(UserError, ValueError):
    """A credential was passed where only a name or URI belongs."""


def refuse_secrets(value: Any, field: str) -> None:
    """Raise when a string parameter looks like a connection string, key or token."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_secrets(v, f"{field}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            refuse_secrets(v, f"{field}[{i}]")
        return
    if isinstance(value, str) and any(p.search(value) for p in _SECRET_PATTERNS):
        raise SecretInParameterError(
            f"{field} looks like a credential (connection string, key, SAS or token). "
            "Credentials never travel as parameters: save them in a Prefect block "
            "(`python -m blocks create`, see README) and pass the block's name instead "
            "(lakehouse.block, source.token_secret, tracking.token_secret)."
        )
