"""Benchmarks (`make bench`): each module prints `name: value` lines and ratios."""

from pathlib import Path


def ingest_jsonl(lake, path: Path, work_dir: Path, dataset_key: str, language: str):
    """Ingest one jsonl file into bronze with the code the Prefect task runs (no server).

    Returns (UnitOutcome, committed): the unit's batch id, rows and table version, and whether
    this call made the commit (False: the unit was in the table already).
    """
    from tasks.bronze import ingest as bronze
    from tasks.bronze import sources
    from tasks.params import SourceParams

    [unit] = sources.resolve_units("json", None, str(path), "train", None, None, lake)
    outcome = bronze.ingest_source_unit(
        lake,
        unit,
        source=SourceParams(dataset="json", data_files=str(path), text_column="text"),
        dataset_key=dataset_key,
        language=language,
        token=None,
        max_rows=None,
        parameters={},
        work_dir=work_dir,
    )
    return outcome, outcome.committed
