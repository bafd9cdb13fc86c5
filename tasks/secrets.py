"""Credential rules: what may never travel as a parameter, a log line or an MLflow param.

General, so flows/params.py (refusing parameters) and tracking (scrubbing what goes to MLflow,
its artifacts and the files it writes) apply the same rules; values loaded from secret blocks
are remembered here, so a token is recognised wherever it turns up later in the process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
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


# Keys whose value is a credential by name. `*_secret` and `block` fields hold the NAME of a
# Prefect block (never the secret), so they are kept when the value looks like a block name.
_SECRET_KEY = re.compile(
    r"(^|[._-])(token|hub_token|secret|password|passwd|pwd|api_?key|access_?key|account_?key|"
    r"key|credentials?|connection_?string|conn_?str|sas|sas_?token|auth)([._-]|$)",
    re.I,
)
_BLOCK_NAME_KEY = re.compile(r"(^|\.)(\w*_secret|block)$")
_BLOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Files read as text when looking for credentials in them.
_TEXT_SUFFIXES = {
    ".yaml",
    ".yml",
    ".json",
    ".txt",
    ".md",
    ".cfg",
    ".ini",
    ".toml",
    ".csv",
    ".env",
    ".log",
    "",
}
_KNOWN_SECRETS: set[str] = set()  # values loaded from secret blocks in this process


def remember_secret(value: str | None) -> None:
    """Treat `value` (a token loaded from a block or the environment) as a secret from now on."""
    if value:
        _KNOWN_SECRETS.add(value)


def is_secret_key(key: str, value: Any) -> bool:
    """True when the key's last part names a credential (a block-name field holding a name is
    not one: `tracking.token_secret: mlflow-token` is kept)."""
    if not _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return False
    holds_block_name = value is None or (isinstance(value, str) and _BLOCK_NAME.fullmatch(value))
    return not (_BLOCK_NAME_KEY.search(key) and holds_block_name)


def secret_reason(value: Any, field: str) -> str | None:
    """Why `value` must not be logged or stored (credential-like, or a loaded secret), or None."""
    try:
        refuse_secrets(value, field)
    except SecretInParameterError as exc:
        return str(exc)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if any(s and s in text for s in _KNOWN_SECRETS):
        return f"{field} contains the value of a secret block; pass the block's name instead."
    return None


def redact(value: Any) -> Any:
    """A copy of `value` with credential-looking strings replaced (for files we write)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and secret_reason(value, "value"):
        return "***redacted***"
    return value


def file_has_secret(path: Path) -> bool:
    """True when the file holds a loaded secret, or (text files) a credential-looking value."""
    size = path.stat().st_size
    if size > 64 * 2**20:
        return False
    data = path.read_bytes()
    if any(s.encode() in data for s in _KNOWN_SECRETS if s):
        return True
    if path.suffix.lower() in _TEXT_SUFFIXES and size < 4 * 2**20:
        return secret_reason(data.decode("utf-8", errors="replace"), str(path)) is not None
    return False
