"""`python -m blocks` and the LakehouseStorage block, against Azurite and a real Prefect server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prefect_azure.credentials import AzureBlobStorageCredentials

from blocks.lakehouse import LakehouseStorage, load_lakehouse_block
from tests.conftest import AZURITE_KEY, run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_create_from_environment(azurite):
    from prefect.client.orchestration import get_client

    tag = uuid.uuid4().hex[:8]
    env = {
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "LAKEHOUSE_CONTAINER": f"made-{tag}",
        "LAKEHOUSE_PREFIX": "demo",
        "LAKEHOUSE_BLOCK": f"lake-{tag}",
        "AZURE_CREDENTIALS_BLOCK": f"creds-{tag}",
        "HF_TOKEN": "hf_" + "x" * 30,
    }
    res = run_cli("blocks", "create", "--create-container", env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"lakehouse-storage/lake-{tag} -> az://made-{tag}/demo" in res.stdout
    assert "secret/hf-token" in res.stdout
    assert AZURITE_KEY not in res.stdout + res.stderr and "hf_xxx" not in res.stdout

    storage = load_lakehouse_block(f"lake-{tag}")
    assert storage.root_uri() == f"az://made-{tag}/demo"
    fs = storage.filesystem()
    fs.pipe_file(f"made-{tag}/demo/probe.txt", b"ok")  # the container was created
    assert fs.cat_file(f"made-{tag}/demo/probe.txt") == b"ok"
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(f"lake-{tag}", "lakehouse-storage")
    # The lakehouse block references the credentials block instead of copying the secret.
    assert "credentials" in doc.block_document_references

    from blocks.secret import load_secret

    assert load_secret("hf-token") == "hf_" + "x" * 30
    assert load_secret(f"absent-{tag}") is None


def test_create_without_environment_says_what_to_set(monkeypatch, capsys):
    from blocks.__main__ import main

    for var in (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_URL",
        "HF_TOKEN",
        "MLFLOW_TRACKING_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    assert main(["create"]) == 1
    assert "AZURE_STORAGE_CONNECTION_STRING" in capsys.readouterr().err


def test_register_block_types(capsys):
    from blocks.__main__ import main

    assert main(["register"]) == 0
    assert "lakehouse-storage" in capsys.readouterr().out


def test_result_storage_round_trip(azure_lakehouse):
    storage = LakehouseStorage.load(azure_lakehouse["block"])
    asyncio.run(storage.write_path("abc/result.json", b'{"x": 1}'))
    assert asyncio.run(storage.read_path("abc/result.json")) == b'{"x": 1}'
    path = f"{azure_lakehouse['container']}/demo/_prefect/results/abc/result.json"
    assert storage.filesystem().exists(path)


def test_account_url_is_used_as_given():
    """Custom hosts (sovereign clouds, Azurite) keep their URL; retries stay bounded."""
    url = "https://acct.blob.core.chinacloudapi.cn"
    storage = LakehouseStorage(
        credentials=AzureBlobStorageCredentials(account_url=url), container="c", retry_total=1
    )
    client = storage.filesystem().service_client
    assert client.url.rstrip("/") == url
    assert client._config.retry_policy.total_retries == 1


def test_missing_block_message():
    with pytest.raises(ValueError, match=r"lakehouse.block='nope-.*'.*python -m blocks create"):
        load_lakehouse_block(f"nope-{uuid.uuid4().hex[:6]}")
