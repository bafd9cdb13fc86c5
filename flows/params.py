"""Loading parameters: YAML configs (default configs/demo.yaml) and dotted `--set` overrides.

The parameter models themselves live in tasks/params.py (tasks receive them, and nothing
under tasks/ imports flows); they are re-exported here because they ARE the flows' parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks import REPO_ROOT
from tasks.params import (  # noqa: F401 - the flows' parameter models, re-exported
    LakehouseParams,
    ModelParams,
    PipelineParams,
    SourceParams,
    TrackingParams,
    TrainParams,
    TransformParams,
    dataset_slug,
    flatten,
)
from tasks.secrets import SecretInParameterError, refuse_secrets  # noqa: F401

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"--set {item!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    # Keep strings that YAML would turn into dates or numbers the user did not mean.
    if isinstance(value, str | int | float | bool) or value is None or isinstance(value, list):
        pass
    else:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {'.'.join(path)}: {p} is not a section")
    node[path[-1]] = value


def load_params(
    config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineParams:
    """Read a YAML config (default configs/demo.yaml) and apply dotted `key=value` overrides."""
    cfg_path = Path(config) if config else DEFAULT_CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"--config {cfg_path}: no such file")
    try:
        tree = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {cfg_path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"--config {cfg_path}: expected a mapping at the top level")
    parsed = [(item, *parse_override(item)) for item in overrides]
    _forget_other_dataset(tree, parsed)
    for item, path, value in parsed:
        if path[0] not in PipelineParams.model_fields:
            raise ValueError(
                f"--set {item!r}: unknown section {path[0]!r}; "
                f"known: {', '.join(PipelineParams.model_fields)}"
            )
        _set_path(tree, path, value)
    return PipelineParams.model_validate(tree)


# What the config says about *its* dataset; another `source.dataset` given with --set does not
# inherit them (the demo's data_files glob is not a pattern of the user's dataset).
DATASET_SPECIFIC = ("data_files", "name", "language", "revision", "split")


def _forget_other_dataset(tree: dict[str, Any], parsed: list[tuple[str, list[str], Any]]) -> None:
    """Drop the config's dataset-specific source keys when --set names another dataset."""
    paths = [path for _, path, _ in parsed]
    new = [value for _, path, value in parsed if path == ["source", "dataset"]]
    source = tree.get("source")
    if not new or not isinstance(source, dict) or source.get("dataset") == new[-1]:
        return
    for key in DATASET_SPECIFIC:
        if ["source", key] not in paths:
            source.pop(key, None)
