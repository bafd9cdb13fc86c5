"""What silver will do: the tokenizer it is built for, its settings, and the pending batches.

Silver reads one pinned bronze version. A bronze batch is pending until the silver table holds
the application transaction `silver-of-<bronze batch id>`; planning never reads row data,
only the lineage columns and the transactions, so it is cheap to repeat (build-silver plans
again on purpose: a concurrent run may have committed meanwhile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import UserError
from tasks.lakehouse.batches import Batch, committed_batches
from tasks.lakehouse.delta import (
    arrow_schema,
    latest_version,
    open_table,
)
from tasks.lakehouse.layout import bronze_dir, rejected_dir, silver_dir, stable_id
from tasks.lakehouse.storage import Lakehouse
from tasks.params import SourceParams, TransformParams
from tasks.silver.cleaning import CleaningRules
from tasks.silver.parts import TOKEN_IDS  # noqa: F401 - list<int32> as parquet names its items
from tasks.silver.tokenize import (
    language_codes,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_key,
)

ROWS_PER_PART = 20_000  # silver rows per parquet part: bounds memory when writing and reading
TEXT_TYPES = {"string", "large_string", "string_view"}
LINEAGE = ("_row_id", "_batch_id")


class SilverError(UserError, ValueError):
    """Silver cannot be built as asked; the message names the field or file and the fix."""


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer silver is built for: it names the silver table."""

    name: str
    revision: str | None
    fingerprint: str
    key: str
    src_lang: str | None = None  # mBART-style language codes set for this language, if any
    tgt_lang: str | None = None


def open_tokenizer(
    name_or_path: str, revision: str | None = None, language: str | None = None
) -> tuple[Any, TokenizerInfo]:
    """Load the model's fast tokenizer (a SilverError when missing or not fast); with
    `language`, the language codes its texts get (mBART: `fr` -> `fr_XX`)."""
    try:
        tok = load_tokenizer(name_or_path, revision)
    except (OSError, ValueError, KeyError) as exc:
        raise SilverError(
            f"model.name_or_path={name_or_path!r}: no tokenizer could be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
            "Give a local model folder or a hub id (the Hub must be reachable), e.g. build the "
            "demo model with `python -m tasks.train.tiny_models --out .work/models`."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise SilverError(
            f"model.name_or_path={name_or_path!r} has only a slow (Python) tokenizer "
            f"({type(tok).__name__}); silver needs a fast one (tokenizer.json). Convert it "
            "with `AutoTokenizer.from_pretrained(..., from_slow=True).save_pretrained(...)`."
        )
    src_lang, tgt_lang = language_codes(tok, language)
    info = TokenizerInfo(
        name=name_or_path,
        revision=revision,
        fingerprint=tokenizer_fingerprint(tok),
        key=tokenizer_key(name_or_path, tok),
        src_lang=src_lang,
        tgt_lang=tgt_lang,
    )
    return tok, info


def params_key(
    rules: CleaningRules,
    *,
    dedupe: bool,
    max_tokens: int | None,
    text_column: str,
    target_column: str | None,
    fingerprint: str,
) -> str:
    """Hash of everything that decides silver's content for a given bronze batch."""
    payload = {
        **rules.to_dict(),
        "dedupe": dedupe,
        "max_tokens": max_tokens,
        "text_column": text_column,
        "target_column": target_column,
        "tokenizer": fingerprint,
    }
    return stable_id(json.dumps(payload, sort_keys=True), length=16)


def silver_batch_id(bronze_batch_id: str, key: str) -> str:
    """The silver (and rejected) batch id for a bronze batch under given parameters."""
    return stable_id("silver", bronze_batch_id, key)


@dataclass
class SilverPlan:
    """Which bronze batches (of a pinned bronze version) silver still has to process."""

    bronze_table: str
    table: str
    rejected_table: str
    tokenizer: TokenizerInfo
    bronze_version: int | None  # the bronze version silver reads (None: no bronze yet)
    pending: list[Batch]
    done: list[str]  # bronze batch ids already in silver
    bronze_schema: dict[str, str] = field(default_factory=dict)
    bronze_batches: int = 0
    ranks: dict[str, int] = field(default_factory=dict)


def silver_app_id(bronze_batch_id: str) -> str:
    """The application transaction of the silver (and rejected) commit of a bronze batch."""
    return f"silver-of-{bronze_batch_id}"


def plan_silver(
    lake: Lakehouse, dataset_key: str, language: str, tokenizer: TokenizerInfo
) -> SilverPlan:
    """Bronze batches of the latest bronze version whose silver transaction is not there yet."""
    bronze_table = bronze_dir(dataset_key, language)
    table = silver_dir(dataset_key, language, tokenizer.key)
    opts = lake.storage_options
    bronze_version = latest_version(lake.table_uri(bronze_table), storage_options=opts)
    bronze = committed_batches(lake, bronze_table, version=bronze_version)  # oldest first
    silver = open_table(lake.table_uri(table), storage_options=opts)
    done_ids = {
        b.batch_id
        for b in bronze
        if silver is not None and (silver.transaction_version(silver_app_id(b.batch_id)) or 0)
    }
    pending = [b for b in bronze if b.batch_id not in done_ids]
    schema: dict[str, str] = {}
    if bronze_version is not None:
        bt = open_table(lake.table_uri(bronze_table), storage_options=opts, version=bronze_version)
        schema = {f.name: str(f.type) for f in arrow_schema(bt)}
    return SilverPlan(
        bronze_table=bronze_table,
        table=table,
        rejected_table=rejected_dir(dataset_key, language, tokenizer.key),
        tokenizer=tokenizer,
        bronze_version=bronze_version,
        pending=pending,
        done=sorted(done_ids),
        bronze_schema=schema,
        bronze_batches=len(bronze),
        ranks={b.batch_id: i for i, b in enumerate(pending)},
    )


def check_columns(
    lake: Lakehouse, plan: SilverPlan, text_column: str, target_column: str | None
) -> None:
    """Fail before Spark starts when bronze lacks a needed column."""
    if not plan.pending:
        return
    where, schema = lake.uri(plan.bronze_table), plan.bronze_schema
    for col, param in (
        (text_column, "source.text_column"),
        (target_column, "source.target_column"),
    ):
        if col is None:
            continue
        if col not in schema:
            raise SilverError(
                f"{where}: no column {col!r} ({param}); bronze has "
                f"{sorted(c for c in schema if not c.startswith('_'))}. Set {param} "
                "to one of them."
            )
        if schema[col] not in TEXT_TYPES:
            raise SilverError(
                f"{where}: column {col!r} ({param}) is {schema[col]}, not text. Point "
                f"{param} at a string column."
            )
    missing = [c for c in LINEAGE if c not in schema]
    if missing:
        raise SilverError(
            f"{where}: not a bronze table (no lineage columns {missing}); "
            "ingest the source with `python -m flows bronze`."
        )


@dataclass
class SilverJob:
    """Settings of one silver run (everything but the data)."""

    text_column: str = "text"
    target_column: str | None = None
    rules: CleaningRules = field(default_factory=CleaningRules)
    dedupe: bool = True
    max_tokens: int | None = None
    batch_size: int = 1000
    sas_minutes: int = 240
    rows_per_part: int = ROWS_PER_PART

    @classmethod
    def from_params(cls, source: SourceParams, transform: TransformParams) -> SilverJob:
        """From the `source.*` columns and the `transform.*` section."""
        return cls(
            text_column=source.text_column,
            target_column=source.target_column,
            rules=CleaningRules.from_dict(transform.model_dump()),
            dedupe=transform.dedupe,
            max_tokens=transform.max_tokens,
            batch_size=transform.tokenize_batch_size,
            sas_minutes=transform.executor_sas_minutes,
        )
