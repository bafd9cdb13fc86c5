"""Benchmarks (`make bench`): each module prints `name: value` lines and ratios."""

from pathlib import Path


def ingest_jsonl(lake, path: Path, work_dir: Path, dataset_key: str, language: str):
    """Ingest one jsonl file into bronze with the code the Prefect task runs (no server)."""
    from tasks.bronze import ingest as bronze

    [unit] = bronze.resolve_units("json", None, str(path), "train", None, None, lake)
    manifest, committed = bronze.ingest_unit(
        lake,
        unit,
        dataset_key=dataset_key,
        language=language,
        split="train",
        name=None,
        text_column="text",
        target_column=None,
        token=None,
        rows_per_part=50_000,
        max_rows=None,
        parameters={},
        work_dir=work_dir,
    )
    return manifest, committed
