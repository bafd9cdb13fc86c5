"""CLI: python -m flows <pipeline|bronze|silver|train|watch|maintain> [--config F] [--set k=v]..."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from pydantic import ValidationError

FLOWS = {
    "pipeline": ("flows.pipeline", "pipeline_flow"),
    "bronze": ("flows.bronze", "bronze_flow"),
    "silver": ("flows.silver", "silver_flow"),
    "train": ("flows.train", "train_flow"),
    "watch": ("flows.watch", "watch_flow"),
    "maintain": ("flows.maintain", "maintain_flow"),
}


def _setup_env() -> None:
    # Safe defaults for local runs; users can override any of them.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or 'parameters'}: {msg}")
    return "invalid parameters:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows",
        description="Run a flow of the lakehouse pipeline with a config and overrides.",
    )
    parser.add_argument("flow", choices=list(FLOWS), help="which flow to run")
    parser.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. train.max_steps=100",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the flow result as one JSON object on the last stdout line",
    )
    args = parser.parse_args(argv)
    _setup_env()

    from flows.params import load_params

    try:
        params = load_params(args.config, args.overrides)
    except ValidationError as exc:
        print(f"error: {_format_validation(exc)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    module, attr = FLOWS[args.flow]
    flow_fn = getattr(importlib.import_module(module), attr)
    try:
        result = flow_fn(params=params)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - report the flow's own message, not a traceback
        from tasks.errors import is_user_error

        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    sys.stdout.flush()
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), sort_keys=False), flush=True)
    else:
        print(result.model_dump_json(indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
