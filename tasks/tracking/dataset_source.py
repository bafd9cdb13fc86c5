"""An MLflow dataset source that is just a table URI (az:// tables have no MLflow source type).

Its own module because it subclasses MLflow's `DatasetSource` at import time, and lineage.py is
imported where MLflow is not needed (the flows' result models read the eval-set identity).
"""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source import DatasetSource


class LakehouseDatasetSource(DatasetSource):
    """A dataset source that is just a URI (az:// tables MLflow has no source type for)."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "lakehouse"

    def load(self, **kwargs):
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any):
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]):
        return cls(source_dict["uri"])
