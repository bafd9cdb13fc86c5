"""What may be logged to MLflow: valid keys, values cut to MLflow's limits, no secrets.

MLflow refuses a whole batch for one over-long value or odd key, and what it stores is readable
by anyone with access to the experiment, so every param and tag passes through `scrub` first:
secret-named keys are dropped and credential-looking values refused (the rules are the
project's, tasks/secrets.py).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from tasks.secrets import SecretInParameterError, is_secret_key, secret_reason

log = logging.getLogger(__name__)

# MLflow limits (mlflow.utils.validation).
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 6000, 8000, 100, 1000


def scrub(
    values: dict[str, Any], kind: str = "param", on_secret: Literal["raise", "drop"] = "raise"
) -> dict[str, str]:
    """Values safe to log as MLflow params or tags: secret-named keys dropped, secrets refused."""
    limit = MAX_PARAM_VALUE if kind == "param" else MAX_TAG_VALUE
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in values.items():
        key = valid_key(str(key))
        if is_secret_key(key, value):
            dropped.append(key)
            continue
        reason = secret_reason(value, key)
        if reason:
            if on_secret == "raise":
                raise SecretInParameterError(reason)
            log.warning("%s %s not logged to MLflow: it looks like a credential", kind, key)
            continue
        out[key] = truncate(as_text(value), limit)
    if dropped:
        log.info("%ss not logged to MLflow (secret by name): %s", kind, ", ".join(dropped))
    return out


def as_text(value: Any) -> str:
    """A param or tag value as MLflow stores it (JSON for containers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, marked as cut."""
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def valid_key(key: str) -> str:
    """MLflow accepts letters, digits, `_ - . / :` and spaces in names (max 250 chars)."""
    return re.sub(r"[^\w./: -]", "_", key)[:250]
