"""`python -m deployments.stack start|stop|status` (`make server`): the local stack on 127.0.0.1.

  Prefect server  http://127.0.0.1:4200   SQLite under .work/stack/prefect, or PostgreSQL when
                                          PREFECT_API_DATABASE_CONNECTION_URL is set
  MLflow server   http://127.0.0.1:5000   SQLite store .work/mlflow/mlflow.db, artifacts beside it
  Azurite (blob)  http://127.0.0.1:10000  data under .work/azurite

Ports: PREFECT_PORT, MLFLOW_PORT, AZURITE_PORT. PIDs and logs go to .work/stack/; `stop` ends
exactly the processes recorded there. `start` writes .work/stack/env to `source` in a shell.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks import REPO_ROOT

ROOT = REPO_ROOT
STACK = ROOT / ".work" / "stack"
HOST = "127.0.0.1"
AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
# Microsoft's published Azurite development account key (public, not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


@dataclass
class Service:
    name: str
    port: int
    cmd: list[str]
    health: str | None  # URL answering 200 when ready; None = the port is enough
    env: dict[str, str]


def services() -> list[Service]:
    """The three services with their command lines (binaries from this venv and .tools)."""
    bin_dir = Path(sys.executable).parent
    prefect_port = int(os.environ.get("PREFECT_PORT", "4200"))
    mlflow_port = int(os.environ.get("MLFLOW_PORT", "5000"))
    azurite_port = int(os.environ.get("AZURITE_PORT", "10000"))
    mlflow_dir = ROOT / ".work" / "mlflow"
    prefect_env = {
        **QUIET,
        "PREFECT_HOME": str(STACK / "prefect"),
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "PREFECT_UI_API_URL": f"http://{HOST}:{prefect_port}/api",
    }
    # Without a URL the server uses SQLite in PREFECT_HOME; with one (postgresql+asyncpg://...)
    # it uses that database: the variable passes through from the caller's environment.
    return [
        Service(
            "prefect",
            prefect_port,
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(prefect_port),
            ],
            f"http://{HOST}:{prefect_port}/api/health",
            prefect_env,
        ),
        Service(
            "mlflow",
            mlflow_port,
            [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(mlflow_dir / "artifacts"),
            ],
            f"http://{HOST}:{mlflow_port}/health",
            dict(QUIET),
        ),
        Service(
            "azurite",
            azurite_port,
            [
                str(AZURITE_BIN),
                "--silent",
                "--disableTelemetry",
                "--location",
                str(ROOT / ".work" / "azurite"),
                "--blobHost",
                HOST,
                "--blobPort",
                str(azurite_port),
                "--skipApiVersionCheck",
                "--loose",
            ],
            None,
            {},
        ),
    ]


def _pid_file(name: str) -> Path:
    return STACK / f"{name}.pid"


def running_pid(name: str) -> int | None:
    """PID recorded for a service, if that process is still alive."""
    try:
        pid = int(_pid_file(name).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_ready(svc: Service, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{svc.name} exited with {proc.returncode}; see {STACK / (svc.name + '.log')}"
            )
        if svc.health is None and port_open(svc.port):
            return
        if svc.health is not None:
            try:
                with urllib.request.urlopen(svc.health, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    raise TimeoutError(
        f"{svc.name} not ready on {HOST}:{svc.port} after {timeout:.0f}s; see "
        f"{STACK / (svc.name + '.log')}"
    )


def start(timeout: float = 180.0) -> int:
    """Start whatever is not running yet, wait until each answers, and print where it is."""
    STACK.mkdir(parents=True, exist_ok=True)
    (ROOT / ".work" / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    for svc in services():
        if running_pid(svc.name):
            print(f"{svc.name}: already running (pid {running_pid(svc.name)})")
            continue
        if port_open(svc.port):
            print(
                f"{svc.name}: port {svc.port} is taken by another process; set "
                f"{svc.name.upper()}_PORT to another port",
                file=sys.stderr,
            )
            return 1
        if svc.name == "azurite" and not AZURITE_BIN.exists():
            print("azurite: not installed (run `make setup`); skipped", file=sys.stderr)
            continue
        log = open(STACK / f"{svc.name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            svc.cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **svc.env},
            start_new_session=True,
        )
        log.close()
        _pid_file(svc.name).write_text(str(proc.pid))
        try:
            wait_ready(svc, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"{svc.name}: {exc}", file=sys.stderr)
            stop_service(svc.name)
            return 1
        print(f"{svc.name}: started (pid {proc.pid}) on http://{HOST}:{svc.port}")
    write_env_file()
    print(f"\nexport the client settings with:  source {STACK / 'env'}")
    print(
        f"Prefect UI: http://{HOST}:{services()[0].port}   "
        f"MLflow UI: http://{HOST}:{services()[1].port}"
    )
    return 0


def write_env_file() -> Path:
    """Shell exports pointing clients (CLI, workers, flows) at this stack."""
    prefect, mlflow, azurite = services()
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://{HOST}:{azurite.port}/devstoreaccount1;"
    )
    lines = [
        f"export PREFECT_API_URL=http://{HOST}:{prefect.port}/api",
        "export PREFECT_SERVER_ANALYTICS_ENABLED=false",
        f"export MLFLOW_TRACKING_URI=http://{HOST}:{mlflow.port}",
        # Azurite's well-known development account: for `python -m blocks create` only.
        f"export AZURITE_CONNECTION_STRING='{conn}'",
    ]
    path = STACK / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def stop_service(name: str, grace: float = 15.0) -> bool:
    """Stop one recorded service (its whole process group); True if something was stopped."""
    pid = running_pid(name)
    _pid = _pid_file(name)
    if pid is None:
        _pid.unlink(missing_ok=True)
        return False
    # Each service was started in its own session: its pgid is its pid, so this reaches the
    # server's workers too and nothing else.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and running_pid(name):
            time.sleep(0.3)
        if not running_pid(name):
            break
    _pid.unlink(missing_ok=True)
    return True


def stop() -> int:
    for svc in reversed(services()):
        print(f"{svc.name}: {'stopped' if stop_service(svc.name) else 'not running'}")
    return 0


def status() -> int:
    code = 0
    for svc in services():
        pid = running_pid(svc.name)
        state = f"running (pid {pid}) on http://{HOST}:{svc.port}" if pid else "stopped"
        print(f"{svc.name}: {state}")
        code |= 0 if pid else 3
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["start", "stop", "status"], nargs="?", default="start")
    args = parser.parse_args(argv)
    return {"start": start, "stop": stop, "status": status}[args.action]()


if __name__ == "__main__":
    sys.exit(main())
