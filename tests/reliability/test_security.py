"""Secrets: refused as parameters, never in Prefect logs/parameters or lakehouse files."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from flows.params import load_params
from tests.conftest import ROOT, run_cli
from tests.integration.test_bronze_local import make_rows

pytestmark = pytest.mark.reliability


def test_storage_key_as_parameter_is_refused(tmp_path):
    canary = "CANARYkey" + uuid.uuid4().hex + "=="
    for override in (
        f"lakehouse.block=DefaultEndpointsProtocol=https;AccountKey={canary}",
        f"lakehouse.root=az://user:{canary}@host/c",
        f"source.data_files=https://a.blob.core.windows.net/c/f?sv=1&sig={canary}",
    ):
        cp = run_cli(
            "flows",
            "bronze",
            "--set",
            override,
            "--set",
            f"lakehouse.root={tmp_path / 'lake'}"
            if "root" not in override
            else "source.language=xx",
            "--json",
            timeout=120,
        )
        assert cp.returncode == 2, cp.stderr[-2000:]
        assert "looks like a credential" in cp.stderr
        assert canary not in cp.stdout + cp.stderr
    assert not (tmp_path / "lake").exists()
    print("reliability: fault=secret_as_parameter refused=3 exit=2 echoed=0")


def _all_bytes_under(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def runs_logs_and_parameters(wanted) -> tuple[list[str], list[dict]]:
    """Log messages and parameters of the flow runs whose `params` satisfy `wanted`, read back
    from the Prefect API (as a user would see them in the UI)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)

    async def read_back() -> tuple[list[str], list[dict]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_task_run_id=None), limit=200
            )
            mine = [r for r in runs if wanted(r.parameters.get("params") or {})]
            messages, offset = [], 0
            while True:  # the API serves at most 200 logs a page
                page = await client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in mine])),
                    limit=200,
                    offset=offset,
                )
                messages += [lg.message for lg in page]
                offset += len(page)
                if len(page) < 200:
                    return messages, [r.parameters for r in mine]

    return anyio.run(read_back)


def test_hf_token_in_secret_block_never_leaks(prefect_harness, tmp_path, jsonl_factory):
    from prefect.blocks.system import Secret

    from flows.bronze import bronze_flow
    from tasks.bronze.sources import SourceError

    canary = "hf_" + uuid.uuid4().hex + "CANARY"
    secret_name = f"hf-canary-{uuid.uuid4().hex[:6]}"
    Secret(value=canary).save(secret_name, overwrite=True)
    root = tmp_path / "lake"
    jsonl_factory("in/a.jsonl", make_rows(30, "tok"))
    base = ["source.language=xx", f"lakehouse.root={root}", f"source.token_secret={secret_name}"]
    ok = bronze_flow(
        params=load_params(
            overrides=[
                *base,
                "source.dataset=json",
                f"source.data_files={tmp_path / 'in' / '*.jsonl'}",
            ]
        )
    )
    assert ok.rows == 30
    # A hub dataset is looked up with the token (offline here, so it fails): the error too
    # must not carry it.
    with pytest.raises(SourceError) as err:
        bronze_flow(params=load_params(overrides=[*base, "source.dataset=org/gated-dataset"]))
    assert canary not in str(err.value)
    messages, parameters = runs_logs_and_parameters(
        lambda p: p.get("source", {}).get("token_secret") == secret_name
    )
    assert len(parameters) == 2 and messages, (len(parameters), len(messages))
    assert not [m for m in messages if canary in m]
    assert canary not in repr(parameters)
    leaked = [p for p, data in _all_bytes_under(root) if canary.encode() in data]
    assert leaked == []
    print(
        f"reliability: fault=canary_hf_token runs=2 logs_checked={len(messages)} "
        f"lakehouse_files_checked={len(_all_bytes_under(root))} leaks=0"
    )


def test_started_servers_bind_loopback_only(azurite, prefect_harness, proxy):
    """Every server this session started (Azurite, Prefect, the proxy) listens on loopback."""
    listening = []
    for proc in [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [
            (proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN
        ]
    ports = {port for _, _, port in listening}
    assert azurite.port in ports and proxy.port in ports
    prefect_port = int(os.environ["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
    assert prefect_port in ports

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        mapped = getattr(addr, "ipv4_mapped", None)  # Java reports ::ffff:127.0.0.1
        return addr.is_loopback or bool(mapped and mapped.is_loopback)

    assert all(loopback(ip) for _, ip, _ in listening), listening
    # The stack `make server` starts: every command line pins the host to 127.0.0.1.
    from deployments.stack import HOST, services

    assert HOST == "127.0.0.1"
    for svc in services():
        host_flag = "--blobHost" if svc.name == "azurite" else "--host"
        assert svc.cmd[svc.cmd.index(host_flag) + 1] == "127.0.0.1", svc.cmd
    print(
        f"reliability: listening_sockets={len(listening)} non_loopback=0 "
        f"stack_services_checked={len(services())} root={ROOT.name}"
    )


def test_storage_key_canary_never_leaks(
    prefect_harness, tiny_models, tmp_path, jsonl_factory, capfd
):
    """A storage account whose key is a canary: the key never shows in the Azure SDK's logs
    (all `azure.*` loggers at DEBUG), our logs, Spark's logs (driver and executors at INFO),
    Prefect logs and parameters, error messages or the blobs written, on success and on
    failure. Silver's executors work with a container SAS, which is not logged either."""
    import base64
    import io
    import logging

    from azure.storage.blob import ContainerClient

    from flows.bronze import bronze_flow
    from tasks.lakehouse.storage import StorageError, open_lakehouse
    from tests.conftest import Azurite
    from tests.reliability.conftest import block_through

    canary = base64.b64encode(f"CANARY-storage-key-{uuid.uuid4().hex}".encode()).decode()
    raw = base64.b64decode(canary).decode()
    server = Azurite(tmp_path / "azurite", account="canaryacct", key=canary)
    server.start()
    try:
        container = f"canary-{uuid.uuid4().hex[:8]}"
        server.create_container(container)
        block = f"lh-{container}"
        block_through(server.port, container, block, azurite=server)
        missing = f"{block}-missing"  # the same account, a container that does not exist
        block_through(server.port, f"{container}-missing", missing, azurite=server)
        open_lakehouse.cache_clear()
        jsonl_factory("in/a.jsonl", make_rows(50, "key"))
        # Everything logged anywhere, the Azure SDK's loggers at DEBUG (as when a user debugs).
        logged = io.StringIO()
        handler = logging.StreamHandler(logged)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        sdk = logging.getLogger("azure")
        old_level = sdk.level
        sdk.setLevel(logging.DEBUG)
        for name in ("", "azure", "prefect", "tasks", "flows"):  # some do not propagate
            logging.getLogger(name).addHandler(handler)

        def params_overrides(blk: str, cont: str) -> list[str]:
            return [
                "source.dataset=json",
                f"source.data_files={tmp_path / 'in' / '*.jsonl'}",
                "source.language=xx",
                f"lakehouse.root=az://{cont}/demo",
                f"lakehouse.block={blk}",
                f"model.name_or_path={tiny_models['t5']}",
                "transform.spark_master=local[2]",
                "transform.min_chars=5",
            ]

        def run(blk: str, cont: str):
            return bronze_flow(params=load_params(overrides=params_overrides(blk, cont)))

        assert run(block, container).rows == 50
        assert run(block, container).rows == 0
        # Silver in its own driver process, Spark's log4j at INFO (a user's SPARK_CONF_DIR):
        # its output holds Spark's logs, the driver's and, in local mode, the executors'.
        conf_dir = tmp_path / "spark-conf"
        conf_dir.mkdir()
        (conf_dir / "log4j2.properties").write_text(
            "rootLogger.level = info\nrootLogger.appenderRef.stderr.ref = console\n"
            "appender.console.type = Console\nappender.console.name = console\n"
            "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = %d %p %c{1}: %m%n%ex\n"
            # A logger's own level: sc.setLogLevel("WARN") only lowers the root logger's.
            "logger.spark.name = org.apache.spark\nlogger.spark.level = info\n"
        )
        sets = [a for o in params_overrides(block, container) for a in ("--set", o)]
        spark_run = subprocess.run(
            [sys.executable, "-m", "flows", "silver", "--json", *sets],
            env={**os.environ, "SPARK_CONF_DIR": str(conf_dir)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert spark_run.returncode == 0, spark_run.stderr[-3000:]
        silvered = json.loads(spark_run.stdout.strip().splitlines()[-1])
        assert silvered["rows"] + sum(silvered["rejected"].values()) == 50
        with pytest.raises(StorageError) as err:
            run(missing, f"{container}-missing")
        blobs = ContainerClient.from_connection_string(server.connection_string, container)
        contents = [blobs.download_blob(b.name).readall() for b in blobs.list_blobs()]
    finally:
        for name in ("", "azure", "prefect", "tasks", "flows"):
            logging.getLogger(name).removeHandler(handler)
        sdk.setLevel(old_level)
        server.kill()
        open_lakehouse.cache_clear()
    sdk_lines = [ln for ln in logged.getvalue().splitlines() if ln.startswith("azure")]
    assert len(sdk_lines) > 10, "the Azure SDK logged (almost) nothing: the check would be empty"
    messages, parameters = runs_logs_and_parameters(
        lambda p: p.get("lakehouse", {}).get("block") in (block, missing)
    )
    assert len(parameters) == 4 and messages, (len(parameters), len(messages))  # 3 bronze, 1 silver
    out, errout = capfd.readouterr()
    places = {
        "azure_sdk_and_other_logs": logged.getvalue(),
        "stdout_stderr": out + errout,
        "spark_logs": spark_run.stdout + spark_run.stderr,
        "error_message": str(err.value),
        "prefect_logs": "\n".join(messages),
        "prefect_parameters": repr(parameters),
    }
    assert "Executor" in places["spark_logs"], "Spark logged nothing at INFO: the check is empty"
    # The executors' SAS (a `sig=` signature) is no more logged than the key.
    for secret in (canary, raw, "sig="):
        leaked = [where for where, text in places.items() if secret in text]
        assert leaked == [], (secret, leaked)
        assert not [c for c in contents if secret.encode() in c]
    print(
        f"reliability: fault=canary_storage_key runs=3 azure_sdk_log_lines={len(sdk_lines)} "
        f"prefect_logs={len(messages)} blobs_checked={len(contents)} leaks=0"
    )
