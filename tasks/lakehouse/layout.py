"""The lakehouse layout, in one place.

```
<root>/landing/<dataset>/...
<root>/bronze/<dataset>/<language>/batch=<id>/part-*.parquet + _manifest.json
<root>/silver/<dataset>/<language>/<tokenizer>/batch=<id>/part-*.parquet + _manifest.json
<root>/silver/<dataset>/<language>/<tokenizer>/_rejected/batch=<id>/...
<root>/models/<run>/checkpoint-*/ and final/
```
"""

from __future__ import annotations

import hashlib

MANIFEST = "_manifest.json"
BATCH_PREFIX = "batch="


def landing_dir(dataset: str) -> str:
    return f"landing/{dataset}"


def bronze_dir(dataset: str, language: str) -> str:
    return f"bronze/{dataset}/{language}"


def silver_dir(dataset: str, language: str, tokenizer: str) -> str:
    return f"silver/{dataset}/{language}/{tokenizer}"


def rejected_dir(dataset: str, language: str, tokenizer: str) -> str:
    return f"{silver_dir(dataset, language, tokenizer)}/_rejected"


def batch_dir(table_dir: str, batch_id: str) -> str:
    return f"{table_dir}/{BATCH_PREFIX}{batch_id}"


def manifest_path(table_dir: str, batch_id: str) -> str:
    return f"{batch_dir(table_dir, batch_id)}/{MANIFEST}"


def models_dir(run_name: str) -> str:
    return f"models/{run_name}"


def stable_id(*parts: object, length: int = 20) -> str:
    """Deterministic id from parts (same inputs -> same id, across processes and machines)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return h[:length]
