"""Silver: clean, deduplicate and tokenize the bronze batches that are not in silver yet.

One Spark job handles every pending bronze batch: it reads exactly the files their manifests
list, cleans and tokenizes in Arrow batches (tasks.silver.tokenize), and deduplicates on normalised
text against all committed silver rows and across the new batches. The driver then writes one
silver batch per bronze batch with deterministic file names and contents, and commits them in
bronze commit order, rejected rows first:

    silver/<ds>/<lang>/<tok>/_rejected/batch=<id>/part-*.parquet + _manifest.json   (first)
    silver/<ds>/<lang>/<tok>/batch=<id>/part-*.parquet + _manifest.json              (then)

Every bronze row lands in exactly one of the two, so silver rows + rejected rows = bronze rows.
Because ids, row order, file names and bytes depend only on the data and the parameters, a run
killed halfway and run again commits exactly what one clean run would have.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.lakehouse.batches import Batch, committed_batches
from tasks.lakehouse.delta import (
    BATCH_META,
    append_batch,
    arrow_schema,
    latest_version,
    live_files,
    open_table,
)
from tasks.lakehouse.layout import bronze_dir, rejected_dir, silver_dir, stable_id
from tasks.lakehouse.storage import Lakehouse
from tasks.params import SourceParams, TransformParams
from tasks.silver.cleaning import CleaningRules
from tasks.silver.tokenize import (
    language_codes,
    load_tokenizer,
    output_schema,
    spark_ddl,
    tokenize_partition,
    tokenizer_fingerprint,
    tokenizer_key,
)

log = logging.getLogger(__name__)

ROWS_PER_PART = 20_000  # silver rows per parquet part: bounds memory when writing and reading
TEXT_TYPES = {"string", "large_string", "string_view"}
# Parquet's standard name for list items: what pyarrow and Spark read back, so the schema in
# the manifest is the schema of the files.
TOKEN_IDS = pa.list_(pa.field("element", pa.int32()))
LINEAGE = ("_row_id", "_batch_id")


class SilverError(UserError, ValueError):
    """Silver cannot be built as asked; the message names the field or file and the fix."""


# -- identities ---------------------------------------------------------------------------
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


# -- planning ----------------------------------------------------------------------------
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


# -- the Spark job -----------------------------------------------------------------------
@dataclass
class SilverJob:
    """Settings of one silver run (everything but the data)."""

    text_column: str = "text"
    target_column: str | None = None
    rules: CleaningRules = field(default_factory=CleaningRules)
    dedupe: bool = True
    max_tokens: int | None = None
    batch_size: int = 1000
    direct_io: bool = False
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
            direct_io=transform.direct_io,
        )


def run_spark_job(
    spark: Any,
    inputs: list[str],
    old_silver: list[str],
    out: str,
    job: SilverJob,
    tokenizer: TokenizerInfo,
    ranks: dict[str, int],
    slices: int,
) -> None:
    """Clean, tokenize and dedupe `inputs`; write rows partitioned by bronze batch to `out`."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    has_target = job.target_column is not None
    read_cols = ["_row_id", "_batch_id", job.text_column] + (
        [job.target_column] if has_target else []
    )
    schema = StructType([StructField(c, StringType()) for c in dict.fromkeys(read_cols)])
    bronze = spark.read.schema(schema).parquet(*inputs).where(F.col("_batch_id").isin(list(ranks)))
    selected = [
        F.col("_row_id"),
        F.col("_batch_id").alias("_bronze_batch_id"),
        F.col(job.text_column).alias("text"),
    ]
    if has_target:
        selected.append(F.col(job.target_column).alias("target"))
    # Parquet parts are single row groups: without a shuffle one core would do all the work.
    bronze = bronze.select(*selected).repartition(slices)

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(job.batch_size))
    body = functools.partial(
        tokenize_partition,
        tokenizer=tokenizer.name,
        revision=tokenizer.revision,
        src_lang=tokenizer.src_lang,
        tgt_lang=tokenizer.tgt_lang,
        rules=job.rules.to_dict(),
        has_target=has_target,
        max_tokens=job.max_tokens,
        ranks=ranks,
    )
    rows = bronze.mapInArrow(body, spark_ddl(output_schema(has_target)))
    rows = rows.withColumn("duplicate_of", F.lit(None).cast("string"))
    if job.dedupe:
        rows = mark_duplicates(spark, rows, old_silver)
    # No shuffle to one file per batch: the driver sorts each batch's rows by _row_id when it
    # writes the final parts, which is what makes the output deterministic anyway.
    rows.drop("_rank").write.mode("overwrite").partitionBy("_bronze_batch_id").parquet(out)


def mark_duplicates(spark: Any, rows: Any, old_silver: list[str]) -> Any:
    """Reject all but one row per normalised text; committed silver rows always win.

    Keeper rule (deterministic): an old silver row, else the row of the earliest bronze commit
    (its rank), then the smallest _row_id.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = rows.withColumn("_is_old", F.lit(False))
    if old_silver:
        old = (
            spark.read.parquet(*old_silver)
            .select("_row_id", "_text_hash")
            .withColumn("_rank", F.lit(-1))
            .withColumn("_is_old", F.lit(True))
        )
        rows = rows.unionByName(old, allowMissingColumns=True)
    # Rows refused earlier have no hash: give each its own key so they do not pile up in one
    # window partition (a bronze row id never looks like a hex hash).
    key = F.coalesce(F.col("_text_hash"), F.col("_row_id"))
    w = Window.partitionBy(key).orderBy("_rank", "_row_id")
    rows = rows.withColumn("_rn", F.row_number().over(w)).withColumn(
        "_keeper", F.first("_row_id").over(w)
    )
    dup = F.col("_text_hash").isNotNull() & (F.col("_rn") > 1)
    excerpt = F.when(
        F.length("text") > 1000, F.concat(F.substring("text", 1, 1000), F.lit("…"))
    ).otherwise(F.col("text"))
    cols = {
        "reason": F.when(dup, F.lit("duplicate")).otherwise(F.col("reason")),
        "detail": F.when(
            dup, F.concat(F.lit("same normalised text as "), F.col("_keeper"))
        ).otherwise(F.col("detail")),
        "duplicate_of": F.when(dup, F.col("_keeper")).otherwise(F.col("duplicate_of")),
        "text": F.when(dup, excerpt).otherwise(F.col("text")),
        "input_ids": F.when(dup, F.lit(None)).otherwise(F.col("input_ids")),
        "num_tokens": F.when(dup, F.lit(None)).otherwise(F.col("num_tokens")),
        "_text_hash": F.when(dup, F.lit(None)).otherwise(F.col("_text_hash")),
    }
    if "labels" in rows.columns:
        cols["labels"] = F.when(dup, F.lit(None)).otherwise(F.col("labels"))
    if "target" in rows.columns:
        cols["target"] = F.when(
            dup,
            F.when(
                F.length("target") > 1000, F.concat(F.substring("target", 1, 1000), F.lit("…"))
            ).otherwise(F.col("target")),
        ).otherwise(F.col("target"))
    return rows.withColumns(cols).filter(~F.col("_is_old")).drop("_is_old", "_rn", "_keeper")


# -- writing batches ---------------------------------------------------------------------
def silver_schema(has_target: bool) -> pa.Schema:
    """Columns of a silver batch (DESIGN.md)."""
    fields = [
        pa.field("_row_id", pa.string()),
        pa.field("_batch_id", pa.string()),
        pa.field("_bronze_batch_id", pa.string()),
        pa.field("text", pa.string()),
    ]
    if has_target:
        fields.append(pa.field("target", pa.string()))
    fields.append(pa.field("input_ids", TOKEN_IDS))
    if has_target:
        fields.append(pa.field("labels", TOKEN_IDS))
    fields += [pa.field("num_tokens", pa.int32()), pa.field("_text_hash", pa.string())]
    return pa.schema(fields)


def rejected_schema(has_target: bool) -> pa.Schema:
    """Columns of a rejected batch: the row, why, and an excerpt of the original text."""
    fields = [
        pa.field("_row_id", pa.string()),
        pa.field("_batch_id", pa.string()),
        pa.field("_bronze_batch_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("text", pa.string()),
    ]
    if has_target:
        fields.append(pa.field("target", pa.string()))
    fields.append(pa.field("duplicate_of", pa.string()))
    return pa.schema(fields)


def _spark_rows(stage_files: list[str], opener: Callable[[str], Any]) -> pa.Table:
    """The Spark output of one bronze batch, sorted by _row_id."""
    tables = []
    for f in stage_files:
        with opener(f) as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        return pa.table({"_row_id": pa.array([], pa.string())})
    table = pa.concat_tables(tables, promote_options="permissive")
    ids = table.column("_row_id")
    if len(tables) > 1 or (
        len(ids) > 1 and not pc.all(pc.less_equal(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py()
    ):
        table = table.sort_by("_row_id")
    return table


def _with_batch_columns(table: pa.Table, batch_id: str, bronze_id: str) -> pa.Table:
    n = table.num_rows
    table = table.drop_columns(
        [c for c in ("_batch_id", "_bronze_batch_id") if c in table.column_names]
    )
    table = table.append_column("_batch_id", pa.array([batch_id] * n, pa.string()))
    return table.append_column("_bronze_batch_id", pa.array([bronze_id] * n, pa.string()))


@dataclass
class BatchOutcome:
    """What silver did with one bronze batch."""

    batch_id: str
    bronze_batch_id: str
    bronze_rows: int
    rows: int
    rejected: dict[str, int]
    committed: bool
    version: int | None = None  # silver table version of the commit


def finalize_batch(
    lake: Lakehouse,
    plan: SilverPlan,
    bronze: Batch,
    rows: pa.Table,
    job: SilverJob,
    key: str,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None = None,
) -> BatchOutcome:
    """Commit the rejected rows, then the silver rows, of one bronze batch (exactly once).

    Both commits carry the bronze batch's silver application transaction; the batch is done
    when silver's exists. After a crash between the two, the rejected transaction is found and
    not committed again.
    """
    has_target = job.target_column is not None
    batch_id = silver_batch_id(bronze.batch_id, key)
    rows = _with_batch_columns(rows, batch_id, bronze.batch_id)
    if rows.num_rows:
        rejected_mask = pc.is_valid(rows.column("reason"))
        good = rows.filter(pc.invert(rejected_mask))
        bad = rows.filter(rejected_mask)
    else:
        good = bad = rows
    counts = dict(sorted(Counter(bad.column("reason").to_pylist()).items())) if bad.num_rows else {}
    if good.num_rows + bad.num_rows != bronze.rows:
        # Never commit a batch that would lose or invent rows.
        raise SilverError(
            f"bronze batch {bronze.batch_id}: {bronze.rows} rows in bronze, but silver "
            f"produced {good.num_rows} + {bad.num_rows} rejected. Its files may have been "
            f"changed after commit: check {lake.uri(plan.bronze_table)}."
        )
    app_id, opts = silver_app_id(bronze.batch_id), lake.storage_options
    metadata = {
        BATCH_META: batch_id,
        "lakehouse.bronze_batch_id": bronze.batch_id,
        "lakehouse.bronze_version": str(plan.bronze_version),
        "lakehouse.tokenizer": plan.tokenizer.name,
        "lakehouse.tokenizer_fingerprint": plan.tokenizer.fingerprint,
        "lakehouse.tokenizer_src_lang": str(plan.tokenizer.src_lang),
        "lakehouse.tokenizer_tgt_lang": str(plan.tokenizer.tgt_lang),
        "lakehouse.params_key": key,
        "lakehouse.rejected": json.dumps(counts),
        **{f"lakehouse.param.{k}": str(v) for k, v in parameters.items()},
    }
    append_batch(
        lake.table_uri(plan.rejected_table),
        _conformed(bad, rejected_schema(has_target)),
        app_id=app_id,
        version=1,
        metadata=metadata,
        storage_options=opts,
        where=lake.uri(plan.rejected_table),
    )
    if on_commit:
        on_commit("rejected", batch_id)
    outcome = append_batch(
        lake.table_uri(plan.table),
        _conformed(good, silver_schema(has_target)),
        app_id=app_id,
        version=1,
        metadata={**metadata, "lakehouse.rejected_table": lake.uri(plan.rejected_table)},
        storage_options=opts,
        where=lake.uri(plan.table),
    )
    if on_commit:
        on_commit("silver", batch_id)
    return BatchOutcome(
        batch_id=batch_id,
        bronze_batch_id=bronze.batch_id,
        bronze_rows=bronze.rows,
        rows=good.num_rows,
        rejected=counts,
        committed=outcome.committed,
        version=outcome.table_version,
    )


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema` (columns absent in an all-rejected Spark output are all nulls)."""
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


# -- the whole run -----------------------------------------------------------------------
def abfss_uri(lake: Lakehouse, rel: str) -> str:
    """abfss://container@account.dfs.core.windows.net/path for Spark with hadoop-azure."""
    account = getattr(lake.fs, "account_name", None)
    container, _, path = lake.path(rel).partition("/")
    if not account:
        raise SilverError(
            "transform.direct_io=true needs the storage account name in the "
            "lakehouse block (account URL or connection string)"
        )
    return f"abfss://{container}@{account}.dfs.core.windows.net/{path}"


def build_silver(
    lake: Lakehouse,
    plan: SilverPlan,
    spark: Any,
    job: SilverJob,
    work_dir: Path,
    parameters: dict[str, Any],
    on_commit: Callable[[str, str], None] | None = None,
) -> list[BatchOutcome]:
    """Process every pending bronze batch in one Spark job and commit one silver batch each."""
    from tasks.silver.spark import parallelism

    if not plan.pending:
        return []
    key = params_key(
        job.rules,
        dedupe=job.dedupe,
        max_tokens=job.max_tokens,
        text_column=job.text_column,
        target_column=job.target_column,
        fingerprint=plan.tokenizer.fingerprint,
    )
    work = Path(work_dir) / f"silver-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    remote_stage: str | None = None
    try:
        inputs = _stage_inputs(lake, plan, work, job.direct_io)
        old = _stage_old_hashes(lake, plan, work, job.direct_io) if job.dedupe else []
        if job.direct_io:
            remote_stage = f"{plan.table}/_work/{work.name}"
            out, opener = abfss_uri(lake, remote_stage), lake.open
        else:
            out, opener = str((work / "spark").resolve()), functools.partial(open, mode="rb")
        total_rows = sum(m.rows for m in plan.pending)
        if inputs and total_rows:
            slices = max(1, min(parallelism(spark) * 2, -(-total_rows // 2000)))
            log.info(
                "silver: %d bronze batch(es), %d rows, %d old silver file(s), %d slices",
                len(plan.pending),
                total_rows,
                len(old),
                slices,
            )
            started = time.perf_counter()
            run_spark_job(spark, inputs, old, out, job, plan.tokenizer, plan.ranks, slices)
            log.info("silver: Spark job took %.1fs", time.perf_counter() - started)
        started = time.perf_counter()
        outcomes = []
        for m in plan.pending:  # bronze commit order
            files = _stage_outputs(lake, out, m.batch_id, remote_stage)
            rows = (
                _spark_rows(files, opener)
                if m.rows
                else pa.table(
                    {"_row_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}
                )
            )
            outcomes.append(finalize_batch(lake, plan, m, rows, job, key, parameters, on_commit))
        log.info(
            "silver: writing and committing %d batch(es) took %.1fs",
            len(outcomes),
            time.perf_counter() - started,
        )
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if remote_stage:
            lake.rm(remote_stage)


def _spark_paths(lake: Lakehouse, files: list[str], direct_io: bool, stage) -> list[str]:
    """Paths Spark reads for a table version's live files (never a folder glob).

    Local lakehouse: the files in place; `direct_io`: abfss:// URIs; otherwise
    `stage(rel)` copies the file into the work folder and returns its local path.
    """
    paths = []
    for uri in files:
        if lake.is_local:
            paths.append(uri.removeprefix("file://"))
            continue
        rel = lake.rel(uri)
        paths.append(abfss_uri(lake, rel) if direct_io else str(stage(rel).resolve()))
    return paths


def _stage_inputs(lake: Lakehouse, plan: SilverPlan, work: Path, direct_io: bool) -> list[str]:
    """Paths of the pinned bronze version's files (Spark keeps the pending batches' rows)."""

    def stage(rel: str) -> Path:
        local = work / "bronze" / rel.replace("/", "_")
        lake.get_file(rel, local)
        return local

    files = live_files(
        lake.table_uri(plan.bronze_table),
        storage_options=lake.storage_options,
        version=plan.bronze_version,
    )
    return _spark_paths(lake, files, direct_io, stage)


def _stage_old_hashes(lake: Lakehouse, plan: SilverPlan, work: Path, direct_io: bool) -> list[str]:
    """Files holding the committed silver rows' _text_hash (and _row_id)."""

    def stage(rel: str) -> Path:
        # Only the two small columns travel, not the token ids.
        with lake.open(rel) as fh:
            table = pq.read_table(fh, columns=["_row_id", "_text_hash"])
        local = work / "hashes" / rel.replace("/", "_")
        local.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, local)
        return local

    files = live_files(lake.table_uri(plan.table), storage_options=lake.storage_options)
    return _spark_paths(lake, files, direct_io, stage)


def _stage_outputs(
    lake: Lakehouse, out: str, bronze_id: str, remote_stage: str | None
) -> list[str]:
    """Spark's output files for one bronze batch."""
    part = f"_bronze_batch_id={bronze_id}"
    if remote_stage is None:
        folder = Path(out) / part
        return sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
    return [f for f in lake.find(f"{remote_stage}/{part}") if f.endswith(".parquet")]
