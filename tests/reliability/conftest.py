"""Fixtures of the reliability suite: a fault-injecting proxy in front of the real Azurite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import Azurite
from tests.reliability.proxy import TcpProxy


def block_through(port: int, container: str, name: str, azurite: Azurite | None = None) -> None:
    """Save a LakehouseStorage block whose BlobEndpoint is 127.0.0.1:`port`."""
    from prefect_azure.credentials import AzureBlobStorageCredentials

    from blocks.lakehouse import LakehouseStorage

    conn = (azurite or Azurite(Path("."), port)).connection_string_via(port)
    creds = AzureBlobStorageCredentials(connection_string=conn)
    # Short SDK retries so that the Prefect task retries (the layer under test) take over.
    LakehouseStorage(
        credentials=creds,
        container=container,
        prefix="demo",
        retry_total=1,
        retry_backoff_seconds=0.2,
        connection_timeout=5,
    ).save(name, overwrite=True)


@pytest.fixture
def proxy(azurite):
    """A TcpProxy in front of the session's Azurite."""
    p = TcpProxy(azurite.port)
    yield p
    p.close()


@pytest.fixture
def proxied_lakehouse(azurite, prefect_harness, proxy, monkeypatch):
    """An az:// lakehouse whose block reaches Azurite only through `proxy`."""
    from tasks.lakehouse.storage import open_lakehouse

    monkeypatch.setenv("LAKEHOUSE_RETRY_DELAY_SCALE", "0.25")
    container = f"rel-{uuid.uuid4().hex[:10]}"
    azurite.create_container(container)
    block = f"lh-{container}"
    block_through(proxy.port, container, block)
    # Assertions read through a second block straight to Azurite, never through the faults.
    block_through(azurite.port, container, f"{block}-direct")
    open_lakehouse.cache_clear()
    yield {
        "root": f"az://{container}/demo",
        "block": block,
        "container": container,
        "proxy": proxy,
        "direct": f"{block}-direct",
    }
    open_lakehouse.cache_clear()
