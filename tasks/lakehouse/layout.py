"""The lakehouse layout, in one place.

```
<root>/landing/<dataset>/...                               files dropped by upstream
<root>/landing/_watch/<dataset>/<id>.json                  watch's create-only announcements
<root>/bronze/<dataset>/<language>/                        Delta table
<root>/silver/<dataset>/<language>/<tokenizer>/            Delta table
<root>/rejected/<dataset>/<language>/<tokenizer>/          Delta table: refused rows + reason
<root>/quarantine/<dataset>/<language>/<id>.json           sources changed after ingestion
<root>/models/<run>/checkpoint-*/ and final/
```
Tables never sit inside another table's folder: a nested `_delta_log` confuses discovery, and
catalogs refuse overlapping locations. That is why rejected rows and quarantine records live
under their own top-level folders instead of inside bronze or silver.
"""

from __future__ import annotations

import hashlib
import re


def slug(name: str) -> str:
    """Folder-safe name: anything but letters, digits, `_ . -` becomes `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def landing_dir(dataset: str) -> str:
    return f"landing/{dataset}"


def watch_dir(dataset: str) -> str:
    return f"landing/_watch/{dataset}"


def bronze_dir(dataset: str, language: str) -> str:
    return f"bronze/{dataset}/{language}"


def silver_dir(dataset: str, language: str, tokenizer: str) -> str:
    return f"silver/{dataset}/{language}/{tokenizer}"


def rejected_dir(dataset: str, language: str, tokenizer: str) -> str:
    return f"rejected/{dataset}/{language}/{tokenizer}"


def quarantine_dir(dataset: str, language: str) -> str:
    return f"quarantine/{dataset}/{language}"


def models_dir(run_name: str) -> str:
    return f"models/{run_name}"


def stable_id(*parts: object, length: int = 20) -> str:
    """Deterministic id from parts (same inputs -> same id, across processes and machines)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return h[:length]
