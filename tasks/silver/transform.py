"""The Spark job: clean, tokenize and deduplicate the pending bronze rows.

Executors read the input files (Spark's parquet reader for local paths; on Azure the Python
workers read them through adlfs: tasks.silver.blob_io), tokenize them with
`tasks.silver.tokenize.tokenize_partition` through `mapInArrow` (one tokenizer per Python
worker), then an exact dedupe on normalised text against every committed silver row and
across the new batches. Committed rows always win, then the earliest bronze commit, then the
smallest `_row_id`, so the outcome does not depend on partitioning or on which run got there
first.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tasks.silver.plan import SilverJob, TokenizerInfo
from tasks.silver.tokenize import (
    output_schema,
    spark_ddl,
    tokenize_partition,
)


def write_table_parts(
    spark: Any,
    inputs: list[str],
    old_silver: list[str],
    job: SilverJob,
    tokenizer: TokenizerInfo,
    ranks: dict[str, int],
    slices: int,
    *,
    silver_dir: str,
    rejected_dir: str,
    batch_ids: dict[str, str],
    access: Any = None,
) -> list[dict[str, Any]]:
    """Run the job with the executors writing silver and rejected parts into the tables'
    folders (`silver_dir`, `rejected_dir`: paths every worker sees, or `container/path` names
    with `access`, the executors' Azure access); returns the reports of the successful tasks'
    files (tasks.silver.parts.REPORT_SCHEMA), never any row data."""
    from tasks.silver.parts import REPORT_DDL, write_parts

    rows = silver_rows(spark, inputs, old_silver, job, tokenizer, ranks, slices, access)
    # Contiguous, sorted ranges of each bronze batch: a batch's parts, in order of their first
    # _row_id, read back in _row_id order.
    rows = rows.drop("_rank").repartitionByRange(slices, "_bronze_batch_id", "_row_id")
    rows = rows.sortWithinPartitions("_bronze_batch_id", "_row_id")
    body = functools.partial(
        write_parts,
        silver_dir=silver_dir,
        rejected_dir=rejected_dir,
        batch_ids=batch_ids,
        has_target=job.target_column is not None,
        rows_per_part=job.rows_per_part,
        access=access,
    )
    return [r.asDict() for r in rows.mapInArrow(body, REPORT_DDL).collect()]


def silver_rows(
    spark: Any,
    inputs: list[str],
    old_silver: list[str],
    job: SilverJob,
    tokenizer: TokenizerInfo,
    ranks: dict[str, int],
    slices: int,
    access: Any = None,
) -> Any:
    """The DataFrame of cleaned, tokenized and deduplicated rows of the pending batches."""
    from pyspark.sql import functions as F

    has_target = job.target_column is not None
    read_cols = ["_row_id", "_batch_id", job.text_column] + (
        [job.target_column] if has_target else []
    )
    bronze = read_parquet(
        spark, inputs, list(dict.fromkeys(read_cols)), access, list(ranks), job.batch_size
    )
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
        tokenizer=executor_tokenizer(tokenizer.name),
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
        old = (
            read_parquet(spark, old_silver, ["_row_id", "_text_hash"], access, None, 10_000)
            if old_silver
            else None
        )
        rows = mark_duplicates(rows, old)
    return rows


def executor_tokenizer(name_or_path: str) -> str:
    """What the executors load: a tokenizer folder given relative to the driver's working
    directory becomes absolute (executors on a cluster run elsewhere; the folder must be on a
    mount they share); a hub id stays as it is."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


def read_parquet(
    spark: Any,
    files: list[str],
    columns: list[str],
    access: Any,
    keep_batches: list[str] | None,
    batch_rows: int,
) -> Any:
    """The string `columns` of parquet `files` (null where a file lacks one); with
    `keep_batches`, only rows of those `_batch_id`s.

    Local paths: Spark's own parquet reader. With `access` (Azure, no JVM connector here) the
    executors read the files in Python through adlfs, one task per file.
    """
    import pyarrow as pa
    from pyspark.sql import functions as F

    ddl = ", ".join(f"`{c}` string" for c in columns)
    if access is None:
        df = spark.read.schema(ddl).parquet(*files)
        return df.where(F.col("_batch_id").isin(keep_batches)) if keep_batches is not None else df
    from tasks.silver.blob_io import read_parquet_files

    body = functools.partial(
        read_parquet_files,
        access=access,
        schema=pa.schema([(c, pa.string()) for c in columns]),
        keep_batches=keep_batches,
        batch_rows=batch_rows,
    )
    listing = spark.createDataFrame([(f,) for f in files], "path string")
    return listing.repartition(max(1, len(files))).mapInArrow(body, ddl)


def mark_duplicates(rows: Any, old: Any | None) -> Any:
    """Reject all but one row per normalised text; committed silver rows always win.

    Keeper rule (deterministic): an old silver row, else the row of the earliest bronze commit
    (its rank), then the smallest _row_id.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = rows.withColumn("_is_old", F.lit(False))
    if old is not None:
        old = (
            old.select("_row_id", "_text_hash")
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
