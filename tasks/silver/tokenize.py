"""Tokenize silver rows with the model's own tokenizer, in Arrow batches inside the executors.

`tokenize_partition` is what Spark's `mapInArrow` runs: it cleans each row (tasks.silver.cleaning),
hashes the normalised text for dedup, and batch-encodes the survivors with the fast tokenizer.
The tokenizer is loaded once per Python worker and reused by every task that worker runs.
This module imports only light dependencies, so Spark workers (local or behind Spark Connect)
can import it without the rest of the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.lakehouse.layout import slug
from tasks.silver.cleaning import CleaningRules, check_target, check_text, dedupe_key, truncate

_TOKENIZERS: dict[tuple[str, str | None, str | None, str | None], Any] = {}
LANG_CODE = re.compile(r"^([a-z]{2,3})_[A-Z]{2}$")  # mBART's en_XX, fr_XX, zh_CN, ...

# The columns Spark hands to tokenize_partition (bronze columns renamed by the silver job).
INPUT_COLUMNS = ["_row_id", "_bronze_batch_id", "text", "target"]


def load_tokenizer(
    name_or_path: str,
    revision: str | None = None,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> Any:
    """The model's fast tokenizer, loaded once per process (each Spark worker has its own),
    with mBART-style `src_lang`/`tgt_lang` set when given."""
    key = (name_or_path, revision, src_lang, tgt_lang)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        # Spark already runs one worker per core; the tokenizer's own thread pool on top of
        # that oversubscribes the cores and can deadlock after fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, use_fast=True)
        # Silver stores whole texts on purpose (training packs or truncates them), so the
        # "longer than model_max_length" warning says nothing useful here.
        tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        # As tokenizer(texts) does before each call: whole texts, no padding.
        tok.backend_tokenizer.no_truncation()
        tok.backend_tokenizer.no_padding()
        if src_lang:
            tok.src_lang = src_lang
        if tgt_lang:
            tok.tgt_lang = tgt_lang
        _TOKENIZERS[key] = tok
    return tok


def language_codes(tokenizer: Any, language: str | None) -> tuple[str | None, str | None]:
    """(src_lang, tgt_lang) for a multilingual tokenizer with language codes (mBART's `fr_XX`).

    `language` is the lakehouse language: `fr` gives (`fr_XX`, None); a pair `en-fr` gives
    (`en_XX`, `fr_XX`). None for tokenizers without codes (T5) and for a language without a
    code in the vocabulary (`multi`, `und`): the tokenizer's defaults stay.
    """
    if not language or not hasattr(tokenizer, "src_lang"):
        return None, None
    codes: dict[str, str] = {}
    for token in tokenizer.all_special_tokens + list(getattr(tokenizer, "lang_code_to_id", {})):
        m = LANG_CODE.match(token)
        if m:
            codes.setdefault(m.group(1), token)
    parts = language.split("-")
    if len(parts) == 2:
        return codes.get(parts[0]), codes.get(parts[1])
    return codes.get(language), None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the backend tokenizer JSON plus the special tokens map."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # Truncation/padding are runtime state that `tokenizer(..., truncation=True)` mutates;
    # they do not change which ids a text gets, so they must not change the identity.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    h = hashlib.sha256()
    h.update(json.dumps(backend, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_key(name_or_path: str, tokenizer: Any) -> str:
    """The `<tokenizer>` folder of silver: `<basename>-<fingerprint[:8]>`."""
    base = Path(name_or_path.rstrip("/")).name or name_or_path
    name = slug(base) or "model"
    return f"{name}-{tokenizer_fingerprint(tokenizer)[:8]}"


def encode(tokenizer: Any, texts: list[str], *, target: bool = False) -> list[list[int]]:
    """Token ids exactly as `tokenizer(text)["input_ids"]` (or `text_target=`) gives them."""
    if not texts:
        return []
    if target:  # text_target switches to the target language's special tokens (mBART)
        kwargs = {"return_attention_mask": False, "return_token_type_ids": False}
        return tokenizer(text_target=texts, **kwargs)["input_ids"]
    # The backend's batch encoder without offsets: the ids `tokenizer(texts)` gives (the
    # post-processor adds the special tokens; truncation is off, see load_tokenizer), without
    # the per-token Python work of building offsets and BatchEncoding.
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts)]


def list_array(rows: list[list[int] | None]) -> pa.Array:
    """list<int32> from Python lists (None: a null row); pyarrow converts them in C++ (3x
    faster than going through numpy, measured with bench/silver.py's corpus)."""
    return pa.array(rows, pa.list_(pa.int32()))


def output_schema(has_target: bool) -> pa.Schema:
    """Arrow schema of what tokenize_partition yields."""
    fields = [
        pa.field("_row_id", pa.string()),
        pa.field("_bronze_batch_id", pa.string()),
        pa.field("_rank", pa.int32()),
        pa.field("text", pa.string()),
    ]
    if has_target:
        fields.append(pa.field("target", pa.string()))
    fields.append(pa.field("input_ids", pa.list_(pa.int32())))
    if has_target:
        fields.append(pa.field("labels", pa.list_(pa.int32())))
    fields += [
        pa.field("num_tokens", pa.int32()),
        pa.field("_text_hash", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
    return pa.schema(fields)


def spark_ddl(schema: pa.Schema) -> str:
    """The same schema as a Spark DDL string (for mapInArrow)."""
    names = {pa.string(): "string", pa.int32(): "int", pa.list_(pa.int32()): "array<int>"}
    return ", ".join(f"`{f.name}` {names[f.type]}" for f in schema)


def tokenize_table(
    batch: pa.RecordBatch | pa.Table,
    tokenizer: Any,
    rules: CleaningRules,
    *,
    has_target: bool,
    max_tokens: int | None,
    ranks: dict[str, int],
) -> pa.RecordBatch:
    """Clean, hash and tokenize one Arrow batch of bronze rows (the unit of mapInArrow)."""
    row_ids = batch.column("_row_id").to_pylist()
    bronze_ids = batch.column("_bronze_batch_id").to_pylist()
    raw_texts = batch.column("text").to_pylist()
    raw_targets = batch.column("target").to_pylist() if has_target else [None] * len(row_ids)
    n = len(row_ids)
    texts: list[str | None] = [None] * n
    targets: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    for i in range(n):
        cleaned, reason, detail = check_text(raw_texts[i], rules)
        if reason is None and has_target:
            cleaned_target, reason, detail = check_target(raw_targets[i], rules)
            targets[i] = cleaned_target
        if reason is None:
            texts[i] = cleaned
        else:
            reasons[i], details[i] = reason, detail

    ok = [i for i in range(n) if reasons[i] is None]
    ids_ok = encode(tokenizer, [texts[i] for i in ok])
    labels_ok = encode(tokenizer, [targets[i] for i in ok], target=True) if has_target else []
    input_ids: list[list[int] | None] = [None] * n
    labels: list[list[int] | None] = [None] * n
    hashes: list[str | None] = [None] * n
    for j, i in enumerate(ok):
        ids = ids_ok[j]
        lab = labels_ok[j] if has_target else None
        longest = max(len(ids), len(lab) if lab is not None else 0)
        if max_tokens is not None and longest > max_tokens:
            reasons[i] = "too_many_tokens"
            details[i] = f"{longest} tokens > max_tokens {max_tokens}"
            continue
        input_ids[i], labels[i] = ids, lab
        hashes[i] = dedupe_key(texts[i], targets[i] if has_target else None)

    # Rejected rows keep an excerpt of the original, so a person can see why.
    for i in range(n):
        if reasons[i] is not None:
            texts[i] = truncate(raw_texts[i])
            targets[i] = truncate(raw_targets[i]) if has_target else None
    num_tokens = [len(x) if x is not None else None for x in input_ids]
    columns: list[pa.Array] = [
        pa.array(row_ids, pa.string()),
        pa.array(bronze_ids, pa.string()),
        pa.array([ranks.get(b, 0) for b in bronze_ids], pa.int32()),
        pa.array(texts, pa.string()),
    ]
    if has_target:
        columns.append(pa.array(targets, pa.string()))
    columns.append(list_array(input_ids))
    if has_target:
        columns.append(list_array(labels))
    columns += [
        pa.array(num_tokens, pa.int32()),
        pa.array(hashes, pa.string()),
        pa.array(reasons, pa.string()),
        pa.array(details, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=output_schema(has_target))


def tokenize_partition(
    batches: Iterable[pa.RecordBatch],
    *,
    tokenizer: str,
    revision: str | None,
    rules: dict[str, Any],
    has_target: bool,
    max_tokens: int | None,
    ranks: dict[str, int],
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: clean, hash and tokenize every batch of one partition."""
    tok = load_tokenizer(tokenizer, revision, src_lang, tgt_lang)
    cleaning = CleaningRules.from_dict(rules)
    for batch in batches:
        if batch.num_rows:
            yield tokenize_table(
                batch, tok, cleaning, has_target=has_target, max_tokens=max_tokens, ranks=ranks
            )


def encode_partition(
    batches: Iterable[pa.RecordBatch], *, tokenizer: str, revision: str | None = None
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of the bare tokenize step: `text` -> `input_ids` (benchmarks, checks)."""
    tok = load_tokenizer(tokenizer, revision)
    for batch in batches:
        ids = encode(tok, batch.column("text").to_pylist())
        yield pa.RecordBatch.from_arrays(
            [batch.column("_row_id"), list_array(ids)], names=["_row_id", "input_ids"]
        )
