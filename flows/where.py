"""`python -m flows.where`: after a run, print where to look (lakehouse, MLflow, registry, UIs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.params import load_params
from tasks.pipeline.summary import human_number


def describe(result: dict, config: str | None) -> str:
    """Human summary of a pipeline result."""
    params = load_params(config)
    lines = ["", "Where to look:"]
    root = params.lakehouse.root
    lines.append(f"  lakehouse        {Path(root).resolve() if '://' not in root else root}")
    for layer in ("bronze", "silver"):
        r = result.get(layer) or {}
        if r:
            lines.append(f"  {layer:<16} {r.get('uri', '')}  ({r.get('message', '')})")
    if not any(result.get(k) for k in ("bronze", "silver", "train")):
        lines.append("  nothing new: every source is already in bronze; silver and the model are")
        lines.append("  up to date (add files to source.data_files, or drop them in landing/)")
    t = result.get("train") or {}
    if t:
        lines.append(f"  checkpoints      {t.get('checkpoint_uri', '')}")
        lines.append(
            f"  train            step {t.get('global_step')} train_loss "
            f"{human_number(t.get('train_loss'))} eval_loss {human_number(t.get('eval_loss'))} "
            f"tokens/s {human_number(t.get('tokens_per_second'))}"
        )
        if t.get("mlflow_run_id"):
            lines.append(
                f"  mlflow run       {t['mlflow_run_id']} in experiment "
                f"{params.tracking.experiment!r} ({params.tracking.uri})"
            )
        if t.get("model_version"):
            lines.append(
                f"  registered model models:/{t['model_name']}/{t['model_version']} "
                f"(aliases: models:/{t['model_name']}@candidate, @champion)"
            )
    uri = params.tracking.uri
    lines += [
        "",
        "Open the UIs:",
        f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        "   -> http://127.0.0.1:5000",
        "  Prefect: make server (Prefect, MLflow, Azurite on 127.0.0.1)"
        "          -> http://127.0.0.1:4200",
        '  Load the champion: .venv/bin/python -c "import mlflow, pandas as pd; '
        f"mlflow.set_tracking_uri('{uri}'); "
        f"m = mlflow.pyfunc.load_model('models:/{params.tracking.registered_model}@champion'); "
        "print(m.predict(pd.DataFrame({'text': ['Bonjour le monde']})))\"",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.where")
    parser.add_argument("--config", default=None)
    parser.add_argument("--result", required=True, help="file with the pipeline's --json line")
    args = parser.parse_args()
    text = Path(args.result).read_text().strip().splitlines()
    if not text:
        # The run printed no result: it failed (its error is above), it did not find nothing new.
        print(f"error: no pipeline result in {args.result}: the run failed", file=sys.stderr)
        return 1
    print(describe(json.loads(text[-1]), args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
