"""`python -m flows.serve` (`make serve`): the champion over REST on 127.0.0.1.

Runs `mlflow models serve -m models:/<tracking.registered_model>@champion --env-manager local`
against `tracking.uri` from the same config and `--set` overrides as the flows, so what is served
is what the pipeline registered. The MLflow token of a secured server comes from its Prefect
Secret block, as in the flows. POST to /invocations:

    curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_records": [{"text": "Le chat dort."}], "params": {"max_new_tokens": 16}}'
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--alias", default="champion", help="registry alias to serve")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tasks.tracking.inference import serve_command
    from tasks.tracking.server import TOKEN_ENV, configure_tracking
    from tasks.tracking.tasks import tracking_token

    tracking = params.tracking
    token = tracking_token(tracking)
    configure_tracking(tracking.uri, token)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.uri}
    if token:
        env[TOKEN_ENV] = token
    # mlflow starts uvicorn (and its model's Python) from PATH: this environment's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = serve_command(tracking.registered_model, alias=args.alias, port=args.port)
    print(
        f"serving models:/{tracking.registered_model}@{args.alias} from {tracking.uri} on "
        f"http://127.0.0.1:{args.port}/invocations",
        flush=True,
    )
    os.execve(cmd[0], cmd, env)  # the server replaces this process: signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
