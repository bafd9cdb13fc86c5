"""Work pools from deployments/*.json: created on a real Prefect API, GPU request rendered."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from deployments.deploy import POOLS, ROOT, build_templates, load_template


def test_checked_in_templates_match_generator():
    # The JSON files are generated from prefect-docker's defaults plus our settings; a
    # prefect-docker upgrade that changes the defaults shows up here.
    built = build_templates()
    for pool, (_, filename, _) in POOLS.items():
        on_disk = json.loads((ROOT / "deployments" / filename).read_text())
        assert on_disk == built[pool], (
            f"deployments/{filename} is stale: run `python -m deployments.deploy templates`"
        )


def test_gpu_template_renders_nvidia_device_request():
    import docker
    from docker.models.containers import _create_container_args
    from docker.types import DeviceRequest
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    template = load_template("docker-gpu")
    # A non-local API URL keeps prefect-docker from asking an engine for its version.
    values = {
        "image": "localhost/lakehouse-seq2seq:abc-cu128",
        "gpu_count": 2,
        "env": {"PREFECT_API_URL": "http://prefect.example:4200/api"},
    }
    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, values))
    assert config.container_create_kwargs["device_requests"] == [
        {"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}
    ]
    assert config.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert config.env["NVIDIA_VISIBLE_DEVICES"] == "all"

    # The same path the Docker worker takes: container settings, then docker-py's host config.
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.44")
    settings = DockerWorker._build_container_settings(None, client, config)
    create = _create_container_args({**settings, "version": "1.44"})
    host = create["host_config"]
    (request,) = host["DeviceRequests"]
    assert isinstance(request, DeviceRequest)
    assert (request.driver, request.count, request.capabilities) == ("nvidia", 2, [["gpu"]])
    assert host["ShmSize"] == 16 * 1024**3
    assert {u["Name"]: u["Soft"] for u in host["Ulimits"]} == {"memlock": -1, "stack": 67108864}
    assert create["image"] == "localhost/lakehouse-seq2seq:abc-cu128"

    # Defaults: every GPU.
    default = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, {}))
    assert default.container_create_kwargs["device_requests"][0]["count"] == -1
    assert default.image.endswith(":cu128")


def test_cpu_template_has_no_gpu_request():
    from prefect_docker.worker import DockerWorkerJobConfiguration

    config = asyncio.run(
        DockerWorkerJobConfiguration.from_template_and_values(load_template("docker-cpu"), {})
    )
    assert "device_requests" not in (config.container_create_kwargs or {})
    assert config.image_pull_policy == "IfNotPresent"
    assert config.env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"


def test_pools_are_created_and_updated_from_templates(prefect_harness):
    from prefect import get_client

    from deployments.deploy import ensure_pools

    first = asyncio.run(ensure_pools())
    again = asyncio.run(ensure_pools())  # idempotent: updates in place
    assert all(line.startswith(("created", "updated")) for line in first)
    assert all(line.startswith("updated") for line in again)

    async def read():
        async with get_client() as client:
            return {name: await client.read_work_pool(name) for name in POOLS}

    pools = asyncio.run(read())
    for name, (kind, _, _) in POOLS.items():
        assert pools[name].type == kind
        assert pools[name].base_job_template == load_template(name)
    gpu_cfg = pools["docker-gpu"].base_job_template["job_configuration"]
    assert gpu_cfg["container_create_kwargs"]["device_requests"][0]["driver"] == "nvidia"


def test_prefect_yaml_defaults_equal_demo_config():
    from flows.params import PipelineParams, load_params

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"pipeline", "bronze", "silver", "train-cpu", "train-gpu", "watch", "maintain"} <= names
    maintain = next(d for d in spec["deployments"] if d["name"] == "maintain")
    assert maintain["schedules"][0]["cron"] == "0 3 * * 0"  # weekly
    demo = load_params()
    for d in spec["deployments"]:
        assert PipelineParams.model_validate(d["parameters"]["params"]) == demo, d["name"]
    pipeline = next(d for d in spec["deployments"] if d["name"] == "pipeline")
    (trigger,) = pipeline["triggers"]
    assert trigger["expect"] == ["lakehouse.landing.arrived"]
    assert trigger["parameters"] == {"data_files": "{{ event.payload.uris }}"}


def test_pipeline_trigger_builds_a_valid_automation():
    from uuid import uuid4

    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pipeline = next(d for d in spec["deployments"] if d["name"] == "pipeline")
    (trigger,) = _initialize_deployment_triggers("pipeline", pipeline["triggers"])
    trigger.set_deployment_id(uuid4())
    automation = trigger.as_automation()
    assert automation.trigger.expect == {"lakehouse.landing.arrived"}
    assert automation.actions[0].parameters == {"data_files": "{{ event.payload.uris }}"}


@pytest.mark.parametrize("infra", ["inline", "process"])
def test_choose_infra_explicit(infra):
    from tasks.pipeline.tasks import choose_infra

    assert choose_infra(infra, "auto")[0] == infra


def test_choose_infra_auto_follows_live_workers(prefect_harness):
    from prefect import get_client

    from deployments.deploy import ensure_pools
    from tasks.pipeline.tasks import choose_infra, live_workers

    asyncio.run(ensure_pools())
    assert choose_infra("auto", "auto")[0] == "inline"  # no worker anywhere

    def beat(pool: str) -> None:
        # What a worker sends every heartbeat interval.
        with get_client(sync_client=True) as client:
            client.send_worker_heartbeat(pool, f"w-{pool}", heartbeat_interval_seconds=30)

    try:
        beat("docker-cpu")
        assert live_workers("docker-cpu") == ["w-docker-cpu"]
        assert choose_infra("auto", "auto")[0] == "docker-cpu"
        assert choose_infra("auto", "gpu")[0] == "inline"  # a GPU was asked for: no CPU pool
        beat("docker-gpu")
        infra, why = choose_infra("auto", "auto")
        assert infra == "docker-gpu" and "w-docker-gpu" in why
        # train.device=cpu never picks the GPU pool.
        assert choose_infra("auto", "cpu")[0] == "docker-cpu"
        assert live_workers("no-such-pool") == []
    finally:
        # The session's server is shared: later `train.infra=auto` runs must not see these
        # workers (they would wait for a docker-gpu worker that never comes).
        with get_client(sync_client=True) as client:
            for pool in ("docker-cpu", "docker-gpu"):
                client.request(
                    "DELETE",
                    "/work_pools/{work_pool_name}/workers/{name}",
                    path_params={"work_pool_name": pool, "name": f"w-{pool}"},
                )
    assert live_workers("docker-cpu") == live_workers("docker-gpu") == []
    assert choose_infra("auto", "auto")[0] == "inline"


def test_portable_params_makes_local_paths_absolute(tmp_path):
    from flows.params import load_params
    from tasks.pipeline.tasks import portable_params

    (tmp_path / ".work" / "models" / "tiny-t5").mkdir(parents=True)
    params = load_params(overrides=["tracking.uri=sqlite:///mlflow.db"]).model_dump(mode="json")
    out = portable_params(params, cwd=tmp_path)
    assert out["lakehouse"]["root"] == str(tmp_path / "lakehouse")
    assert out["model"]["name_or_path"] == str(tmp_path / ".work" / "models" / "tiny-t5")
    assert out["tracking"]["uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert params["lakehouse"]["root"] == "./lakehouse"  # the input is not modified
    hub = portable_params(
        {
            **params,
            "model": {"name_or_path": "google/mt5-small"},
            "lakehouse": {"root": "az://c/p", "block": "b"},
        },
        cwd=tmp_path,
    )
    assert hub["model"]["name_or_path"] == "google/mt5-small"
    assert hub["lakehouse"]["root"] == "az://c/p"


@pytest.mark.parametrize(
    "api,overrides,mlflow_runs,expected",
    [
        # Deployed to `make server`: runs go to the stack's MLflow server.
        ("http://127.0.0.1:4299/api", [], True, "http://127.0.0.1:5099"),
        ("http://localhost:4299/api", ["train.max_steps=5"], True, "http://127.0.0.1:5099"),
        # A tracking.uri on the command line wins.
        ("http://127.0.0.1:4299/api", ["tracking.uri=sqlite:///x.db"], True, "sqlite:///x.db"),
        # Not the stack's Prefect server, or its MLflow is not running: prefect.yaml's default.
        ("http://127.0.0.1:4300/api", [], True, None),
        ("http://127.0.0.1:4299/api", [], False, None),
    ],
)
def test_deploy_to_the_local_stack_tracks_to_its_mlflow(
    api, overrides, mlflow_runs, expected, monkeypatch
):
    from deployments import deploy, stack

    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_PORT", "4299")
    monkeypatch.setenv("MLFLOW_PORT", "5099")
    running = {"prefect": 101, "mlflow": 102 if mlflow_runs else None}
    monkeypatch.setattr(stack, "running_pid", running.get)
    deployed = {}

    def fake_deploy(names, build, push=True, params=None) -> int:
        deployed["params"] = params
        return 0

    monkeypatch.setattr(deploy, "run_prefect_deploy", fake_deploy)
    args = ["deployments", "--build", "no", *[a for o in overrides for a in ("--set", o)]]
    assert deploy.main(args) == 0
    params = deployed["params"]
    if expected is None and not overrides:
        assert params is None  # prefect.yaml as it is
    else:
        assert params["tracking"]["uri"] == expected
        assert params["tracking"]["experiment"] == "lakehouse-seq2seq-demo"  # the rest as before
