"""Shared fixtures: real Azurite, a Prefect test harness, tiny models built locally."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.spark",
    "tests.fixtures.mlflow",
    "tests.fixtures.prefect_server",
    "tests.fixtures.training",
]

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
# Microsoft's published Azurite development account (not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Prefect sets up its console log handler on the sys.stderr of the moment it is first fully
# imported. Done here (collection time) that is pytest's session-long stream; left to the first
# test that imports it, it may be that test's capfd/capsys stream, closed afterwards, and every
# later flow's console logging fails ("I/O operation on closed file").
import prefect.main  # noqa: E402, F401

from tests.fixtures.ports import PortTaken, free_port, owns_port  # noqa: E402

# Variables that hold credentials (MLFLOW_TRACKING_TOKEN, AZURE_STORAGE_CONNECTION_STRING, ...).
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|SAS|CONNECTION_STRING", re.IGNORECASE)


@pytest.fixture(autouse=True)
def _credentials_stay_in_their_test():
    """A credential that a test, or the code it runs, puts in os.environ is gone when it ends:
    every later test would otherwise run with it (and a canary would leak from there)."""
    before = {k: v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    yield
    after = {k: v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    left = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not left, f"this test changed credential variables of the session: {left}"


class Azurite:
    """A real Azurite blob server on loopback; can be killed and restarted on the same data."""

    def __init__(
        self,
        location: Path,
        port: int | None = None,
        account: str = AZURITE_ACCOUNT,
        key: str = AZURITE_KEY,
    ):
        # A port of our choosing moves when taken at the first start; a restart keeps it.
        self.location, self.port, self.port_movable = location, port or free_port(), port is None
        self.account, self.key = account, key
        self.proc: subprocess.Popen | None = None

    def connection_string_via(self, port: int) -> str:
        """The connection string of this account, its blob endpoint on 127.0.0.1:`port`."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};"
            f"AccountKey={self.key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{self.account};"
        )

    @property
    def connection_string(self) -> str:
        return self.connection_string_via(self.port)

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart, on the same data and port) and wait until it listens."""
        if not AZURITE_BIN.exists():
            pytest.fail("Azurite is not installed: run `make setup` (npm azurite@3 into .tools)")
        for _ in range(3):
            self._spawn()
            deadline = time.monotonic() + timeout
            # Up means our own process listens: another one may hold the port.
            while self.proc.poll() is None and time.monotonic() < deadline:
                if owns_port(self.proc.pid, self.port):
                    self.port_movable = False
                    return
                time.sleep(0.2)
            code = self.proc.poll()
            self.kill()
            if code is None or not self.port_movable:
                break
            self.port = free_port()  # it exited: most likely its port was taken meanwhile
        raise PortTaken(f"Azurite did not listen on 127.0.0.1:{self.port} (exit code {code})")

    def _spawn(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(AZURITE_BIN),
                "--silent",
                "--disableTelemetry",
                "--location",
                str(self.location),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--skipApiVersionCheck",
                "--loose",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            # Another account than the published development one (e.g. a canary key).
            env={**os.environ, "AZURITE_ACCOUNTS": f"{self.account}:{self.key}"}
            if self.account != AZURITE_ACCOUNT
            else None,
        )

    def saved_blobs(self, container: str) -> set[str]:
        """Names of the container's blobs in Azurite's on-disk metadata: what survives a SIGKILL
        (Azurite keeps metadata in memory and saves it every few seconds)."""
        db = self.location / "__azurite_db_blob__.json"
        try:
            collections = json.loads(db.read_text(encoding="utf-8"))["collections"]
        except (FileNotFoundError, ValueError, KeyError):  # not saved yet, or mid-write
            return set()
        blobs = next((c["data"] for c in collections if c["name"] == "$BLOBS_COLLECTION$"), [])
        return {b["name"] for b in blobs if b.get("containerName") == container}

    def kill(self) -> None:
        """SIGKILL, like a crash: no clean shutdown, the data folder stays as it is."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string)
        try:
            client.create_container(name)
        except Exception as exc:  # noqa: BLE001
            if "ContainerAlreadyExists" not in str(exc):
                raise


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Azurite:
    """A real Azurite blob service for the whole session."""
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary, SQLite) Prefect server for flows, blocks, events and artifacts."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        # Subprocesses (`python -m flows ...` in CLI tests) talk to the same server.
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture
def azure_lakehouse(azurite, prefect_harness):
    """An az:// lakehouse root in a fresh container, with its LakehouseStorage block saved."""
    from prefect_azure.credentials import AzureBlobStorageCredentials

    from blocks.lakehouse import LakehouseStorage
    from tasks.lakehouse.storage import open_lakehouse

    container = f"lake-{uuid.uuid4().hex[:10]}"
    azurite.create_container(container)
    creds = AzureBlobStorageCredentials(connection_string=azurite.connection_string)
    block_name = f"lh-{container}"
    LakehouseStorage(credentials=creds, container=container, prefix="demo").save(
        block_name, overwrite=True
    )
    open_lakehouse.cache_clear()
    yield {"root": f"az://{container}/demo", "block": block_name, "container": container}
    open_lakehouse.cache_clear()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny T5 and mBART models with a Unigram tokenizer trained on the shipped sample."""
    from tasks.train.tiny_models import build_tiny_models

    cache = ROOT / ".work" / "test-models"
    return build_tiny_models(cache)


@pytest.fixture
def jsonl_factory(tmp_path):
    """Write rows to a jsonl file and return its path."""
    import json

    def make(name: str, rows: list[dict], folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    return make


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh process (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bronze_args(root: str, data_files, block: str | None = None, *extra: str) -> list[str]:
    """`python -m` arguments of a bronze CLI run over a json source (language xx)."""
    args = [
        "flows",
        "bronze",
        "--set",
        "source.dataset=json",
        "--set",
        f"source.data_files={data_files}",
        "--set",
        "source.language=xx",
        "--set",
        f"lakehouse.root={root}",
    ]
    if block:
        args += ["--set", f"lakehouse.block={block}"]
    return [*args, *extra, "--json"]


def last_json(stdout: str) -> dict:
    import json

    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


@pytest.fixture
def copy_sample(tmp_path):
    """Copy the shipped sample into tmp and return the folder."""
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst)
    return dst
