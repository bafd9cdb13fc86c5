"""`python -m deployments.deploy`: work pools, blocks, result storage and deployments.

Steps, each idempotent (re-running updates in place):
  1. work pools `process`, `docker-cpu`, `docker-gpu` from the base job templates in this folder;
  2. the project's block types, and a default result storage block (so a parent flow can read
     the result of a training run that ran on another worker);
  3. `prefect deploy --all` on prefect.yaml (or the deployments named with --name).

`--build auto` (the default) builds and pushes the training images only when a Docker engine
answers; without one the docker deployments are still created and point at the image tags that
`deployments/engine/build-image.sh` (or CI) builds. `python -m deployments.deploy templates`
re-generates the JSON templates from prefect-docker's defaults plus this project's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tasks import REPO_ROOT

ROOT = REPO_ROOT
HERE = Path(__file__).resolve().parent
IMAGE = "localhost/lakehouse-seq2seq"
RESULTS_BLOCK = "lakehouse-results"

# pool name -> (worker type, template file, description)
POOLS: dict[str, tuple[str, str, str]] = {
    "process": (
        "process",
        "process.json",
        "Flows as local processes (hosts without Docker); runs pipeline, bronze, "
        "silver, watch and train-process.",
    ),
    "docker-cpu": (
        "docker",
        "docker-cpu.json",
        "Training in the project image on CPU (train-cpu).",
    ),
    "docker-gpu": (
        "docker",
        "docker-gpu.json",
        "Training in the CUDA project image with all NVIDIA GPUs (train-gpu).",
    ),
}

# Settings every flow run of ours wants, whatever the pool.
COMMON_ENV = {
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",  # the parent reads the child's TrainResult
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
# PyTorch on NVIDIA GPUs: all devices visible with compute capability; an allocator that
# fragments less on variable-length seq2seq batches; NCCL quiet unless something is wrong.
GPU_ENV = {
    "NVIDIA_VISIBLE_DEVICES": "all",
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NCCL_DEBUG": "WARN",
    "OMP_NUM_THREADS": "4",
}
# NVIDIA's container guidance for PyTorch: unlimited locked memory, a 64 MiB stack, and a
# /dev/shm large enough for DataLoader workers (Docker's default is 64 MiB).
GPU_ULIMITS = [
    {"name": "memlock", "soft": -1, "hard": -1},
    {"name": "stack", "soft": 67108864, "hard": 67108864},
]


# -- base job templates --------------------------------------------------------------------------
def _default_template(worker_type: str) -> dict[str, Any]:
    if worker_type == "docker":
        from prefect_docker.worker import DockerWorker

        return DockerWorker.get_default_base_job_template()
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def _set_default(template: dict[str, Any], name: str, value: Any) -> None:
    template["variables"]["properties"][name]["default"] = value


def build_templates() -> dict[str, dict[str, Any]]:
    """The three base job templates: the workers' defaults plus this project's settings."""
    process = _default_template("process")
    _set_default(process, "env", dict(COMMON_ENV))

    cpu = _default_template("docker")
    _set_default(cpu, "image", f"{IMAGE}:latest")
    # Locally built images are not on a registry: pull only when missing.
    _set_default(cpu, "image_pull_policy", "IfNotPresent")
    _set_default(cpu, "auto_remove", True)
    _set_default(cpu, "env", dict(COMMON_ENV))
    _set_default(cpu, "container_create_kwargs", {"shm_size": "2g"})

    gpu = copy.deepcopy(cpu)
    _set_default(gpu, "image", f"{IMAGE}:cu128")
    _set_default(gpu, "env", {**COMMON_ENV, **GPU_ENV})
    props = gpu["variables"]["properties"]
    # GPU settings are first-class variables (typed fields in the UI, `job_variables` in
    # prefect.yaml) instead of a free-form dict a user could overwrite by accident.
    del props["container_create_kwargs"]
    props["gpu_count"] = {
        "title": "GPU count",
        "type": "integer",
        "default": -1,
        "description": "NVIDIA GPUs given to the container (-1: all).",
    }
    props["shm_size"] = {
        "title": "Shared memory",
        "type": "string",
        "default": "16g",
        "description": "Size of /dev/shm (PyTorch DataLoader workers share batches there).",
    }
    gpu["job_configuration"]["container_create_kwargs"] = {
        # docker-py turns these dicts into DeviceRequest / Ulimit objects (`--gpus all`).
        "device_requests": [
            {"driver": "nvidia", "count": "{{ gpu_count }}", "capabilities": [["gpu"]]}
        ],
        "shm_size": "{{ shm_size }}",
        "ulimits": GPU_ULIMITS,
    }
    return {"process": process, "docker-cpu": cpu, "docker-gpu": gpu}


def write_templates(folder: Path = HERE) -> list[Path]:
    """Write the templates as deployments/<pool>.json (the files `make deploy` reads)."""
    written = []
    for pool, template in build_templates().items():
        path = folder / POOLS[pool][1]
        path.write_text(json.dumps(template, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def load_template(pool: str) -> dict[str, Any]:
    """The checked-in base job template of a pool."""
    return json.loads((HERE / POOLS[pool][1]).read_text(encoding="utf-8"))


# -- server-side objects -------------------------------------------------------------------------
async def ensure_pools(pools: list[str] | None = None) -> list[str]:
    """Create the work pools, or update their base job templates when they exist."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done = []
    async with get_client() as client:
        for name in pools or list(POOLS):
            kind, _, description = POOLS[name]
            template = load_template(name)
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type=kind, base_job_template=template, description=description
                    )
                )
                done.append(f"created work pool {name} ({kind})")
                continue
            await client.update_work_pool(
                name, WorkPoolUpdate(base_job_template=template, description=description)
            )
            done.append(f"updated work pool {name} ({kind})")
    return done


async def ensure_result_storage(block: str | None = None, folder: Path | None = None) -> str:
    """Make `block` (type/name) the server's default result storage; create a local one if unset.

    Training that runs on another worker returns its TrainResult through this storage, so it
    must be readable by both sides: the LakehouseStorage block in Azure mode, a folder on this
    host for the process pool (docker pools mount the project folder at the same path).
    """
    from prefect import get_client
    from prefect.filesystems import LocalFileSystem

    async with get_client() as client:
        if block is None:
            path = folder or ROOT / ".work" / "prefect-results"
            path.mkdir(parents=True, exist_ok=True)
            await LocalFileSystem(basepath=str(path)).save(RESULTS_BLOCK, overwrite=True)
            block = f"local-file-system/{RESULTS_BLOCK}"
        block_type, name = block.split("/", 1)
        document = await client.read_block_document_by_name(name, block_type)
        await client.update_server_default_result_storage(document.id)
    return block


def register_block_types() -> None:
    """Register the project's block types (they then appear in the UI's block catalogue)."""
    from blocks.__main__ import register

    register()


# -- prefect deploy ------------------------------------------------------------------------------
def docker_engine_answers() -> bool:
    """True when a Docker-API engine (Docker, or Podman's socket) answers."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


def derived_prefect_file(
    build: bool, push: bool, params: dict[str, Any] | None, source: Path = ROOT / "prefect.yaml"
) -> Path:
    """prefect.yaml as is, or a copy without image build/push steps and/or with other params."""
    if build and push and params is None:
        return source
    spec = yaml.safe_load(source.read_text(encoding="utf-8"))
    for deployment in spec.get("deployments", []):
        if not build:
            deployment["build"] = None
        if not build or not push:
            deployment["push"] = None
        if params is not None and "params" in (deployment.get("parameters") or {}):
            deployment["parameters"] = {**deployment["parameters"], "params": params}
    out = Path(tempfile.mkdtemp(prefix="prefect-yaml-")) / "prefect.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return out


def run_prefect_deploy(
    names: list[str] | None, build: bool, push: bool = True, params: dict[str, Any] | None = None
) -> int:
    """`prefect deploy --all` (or --name ...) from the project root; returns the exit code."""
    prefect_file = derived_prefect_file(build, push, params)
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "deploy",
        "--no-prompt",
        "--prefect-file",
        str(prefect_file),
    ]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    # prefect.yaml's process pull step runs flows from `{{ $PWD }}`: the project root.
    env = {
        **os.environ,
        "PWD": str(ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "IMAGE_REPOSITORY": image_repository(),
    }
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def image_repository() -> str:
    """Where images go: $IMAGE_REPOSITORY (a registry), else the local-only default."""
    return os.environ.get("IMAGE_REPOSITORY") or IMAGE


def api_url() -> str | None:
    """The server to deploy to: $PREFECT_API_URL, else a running `make server`, else the profile.

    Deploying to Prefect's temporary in-process server would create nothing that lasts.
    """
    from deployments import stack

    url = os.environ.get("PREFECT_API_URL")
    if not url and stack.running_pid("prefect"):
        url = f"http://{stack.HOST}:{stack.services()[0].port}/api"
        # Set before Prefect is imported, so this process and `prefect deploy` both use it.
        os.environ["PREFECT_API_URL"] = url
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    return url or None


def stack_tracking_uri(api: str, overrides: list[str]) -> str | None:
    """The local stack's MLflow URL, when deploying to the stack's Prefect server while its MLflow
    server runs and the command line names no `tracking.uri`; else None.

    Runs of a deployment made against `make server` then land in the MLflow server that a user
    opens at http://127.0.0.1:5000, not in a file store in the worker's folder.
    """
    from urllib.parse import urlsplit

    from deployments import stack

    prefect, mlflow = stack.services()[:2]
    target = urlsplit(api)
    if target.hostname not in (stack.HOST, "localhost") or target.port != prefect.port:
        return None
    if any(o.split("=", 1)[0].strip() == "tracking.uri" for o in overrides):
        return None
    if not stack.running_pid("mlflow"):
        return None
    return f"http://{stack.HOST}:{mlflow.port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "action",
        nargs="?",
        default="all",
        choices=["all", "pools", "templates", "deployments"],
        help="all (default): pools, blocks, result storage, deployments",
    )
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="deploy only these deployments (e.g. pipeline, train-cpu)",
    )
    parser.add_argument(
        "--build",
        choices=["auto", "yes", "no"],
        default="auto",
        help="build/push images: auto = only when a Docker engine answers",
    )
    parser.add_argument(
        "--config", default=None, help="deploy with this YAML config as the default flow parameters"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the default parameters",
    )
    parser.add_argument(
        "--result-storage",
        default=os.environ.get("LAKEHOUSE_RESULT_STORAGE"),
        help="block slug for results (e.g. lakehouse-storage/lakehouse); "
        "default: local-file-system/lakehouse-results under --results-dir",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=ROOT / ".work" / "prefect-results",
        help="folder of the default local result storage block",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    if args.action == "templates":
        for path in write_templates():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    api = api_url()
    if api is None:
        print(
            "error: no Prefect server to deploy to: start one with `make server` (then "
            "`source .work/stack/env`) or set PREFECT_API_URL",
            file=sys.stderr,
        )
        return 2
    print(f"Prefect API: {api}")
    params = None
    stack_mlflow = stack_tracking_uri(api, args.overrides)
    if args.config or args.overrides or stack_mlflow:
        from flows.params import TrackingParams, load_params

        try:
            loaded = load_params(args.config, args.overrides)
            # The stack's MLflow replaces only the built-in file store, never a chosen server.
            if stack_mlflow and loaded.tracking.uri == TrackingParams().uri:
                print(f"tracking.uri: {stack_mlflow} (the MLflow server of `make server`)")
                loaded = load_params(args.config, [*args.overrides, f"tracking.uri={stack_mlflow}"])
            params = loaded.model_dump(mode="json")
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.action in ("all", "pools"):
        for line in asyncio.run(ensure_pools()):
            print(line)
    if args.action == "pools":
        return 0
    if args.action == "all":
        register_block_types()
        block = asyncio.run(ensure_result_storage(args.result_storage, args.results_dir.resolve()))
        print(f"default result storage: {block}")
    build = args.build == "yes" or (args.build == "auto" and docker_engine_answers())
    # A localhost/ repository has no registry behind it: build only, nothing to push.
    push = not image_repository().startswith("localhost/")
    if not build:
        print(
            "no image build (no Docker engine answers, or --build no): the docker "
            f"deployments use {IMAGE}:latest / :cu128 as built by "
            "deployments/engine/build-image.sh"
        )
    return run_prefect_deploy(args.name or None, build, push, params)


if __name__ == "__main__":
    sys.exit(main())
