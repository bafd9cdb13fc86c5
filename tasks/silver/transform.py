"""The Spark job: clean, tokenize and deduplicate the pending bronze rows.

Executors run `tasks.silver.tokenize.tokenize_partition` through `mapInArrow` (one tokenizer per
Python worker), then an exact dedupe on normalised text against every committed silver row and
across the new batches. Committed rows always win, then the earliest bronze commit, then the
smallest `_row_id`, so the outcome does not depend on partitioning or on which run got there
first.
"""

from __future__ import annotations

import functools
from typing import Any

from tasks.silver.plan import SilverJob, TokenizerInfo
from tasks.silver.tokenize import (
    output_schema,
    spark_ddl,
    tokenize_partition,
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
    """Clean, tokenize and dedupe `inputs`; write rows partitioned by bronze batch to `out`
    (the staging path: the driver reads them back; see `write_table_parts`)."""
    rows = silver_rows(spark, inputs, old_silver, job, tokenizer, ranks, slices)
    # No shuffle to one file per batch: the driver sorts each batch's rows by _row_id when it
    # writes the final parts, which is what makes the output deterministic anyway.
    rows.drop("_rank").write.mode("overwrite").partitionBy("_bronze_batch_id").parquet(out)


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
) -> list[dict[str, Any]]:
    """Run the job with the executors writing silver and rejected parts into the tables'
    folders (`silver_dir`, `rejected_dir`: paths every worker sees); returns the reports of
    the successful tasks' files (tasks.silver.parts.REPORT_SCHEMA), never any row data."""
    from tasks.silver.parts import REPORT_DDL, write_parts

    rows = silver_rows(spark, inputs, old_silver, job, tokenizer, ranks, slices)
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
) -> Any:
    """The DataFrame of cleaned, tokenized and deduplicated rows of the pending batches."""
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
    return rows


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
