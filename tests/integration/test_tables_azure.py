"""The Delta table layer on Azure Blob (real Azurite): exactly once, races, a lost commit reply,
files written elsewhere, and errors that name the problem without a credential.

What does not differ from a local folder (schemas, maintenance rules) is in tests/unit.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tasks.lakehouse.delta_access import AzureAccess, delta_storage_options
from tasks.lakehouse.maintenance import maintain_table
from tasks.lakehouse.tables import (
    AddedFile,
    TableError,
    append_batch,
    commit_files,
    ensure_table,
    latest_version,
    read_table,
    transaction_version,
)
from tests.delta_reader import read_delta, sorted_rows
from tests.reliability.proxy import TcpProxy
from tests.unit.test_tables import SCHEMA, rows


def options(azurite, port: int | None = None, **access) -> dict[str, str]:
    access = {"account_key": azurite.key, **access} if "sas_token" not in access else access
    endpoint = f"http://127.0.0.1:{port or azurite.port}/{azurite.account}"
    return delta_storage_options(
        AzureAccess(account_name=azurite.account, endpoint=endpoint, max_retries=1, **access)
    )


@pytest.fixture
def container(azurite) -> str:
    name = f"tables-{uuid.uuid4().hex[:10]}"
    azurite.create_container(name)
    return name


@pytest.fixture
def blob_fs(azurite) -> pafs.FileSystem:
    """pyarrow's own Azure filesystem: the other engine, no delta-rs involved."""
    return pafs.AzureFileSystem(
        account_name=azurite.account,
        account_key=azurite.key,
        blob_storage_authority=f"127.0.0.1:{azurite.port}",
        blob_storage_scheme="http",
        dfs_storage_authority=f"127.0.0.1:{azurite.port}",
        dfs_storage_scheme="http",
    )


def append(uri, data, app_id, opts, version=1, token="w1"):
    return append_batch(
        uri,
        data,
        app_id=app_id,
        version=version,
        writer_token=token,
        metadata={"k": "v"},
        storage_options=opts,
    )


def test_exactly_once_on_azure_and_other_readers_agree(azurite, container, blob_fs):
    opts = options(azurite)
    uri, path = f"az://{container}/demo/bronze/json/xx", f"{container}/demo/bronze/json/xx"
    ensure_table(uri, schema=SCHEMA, storage_options=opts)
    assert append(uri, rows(0, 10), "unit-a", opts).committed
    assert not append(uri, rows(0, 10), "unit-a", opts, token="w2").committed
    assert append(uri, rows(10, 5), "unit-a", opts, version=2).committed
    assert transaction_version(uri, "unit-a", storage_options=opts) == 2
    ours = sorted_rows(read_table(uri, storage_options=opts), "_row_id")
    assert len(ours) == 15 and sorted_rows(read_delta(blob_fs, path), "_row_id") == ours
    pinned = latest_version(uri, storage_options=opts)
    append(uri, rows(20, 5), "unit-b", opts)
    result = maintain_table(uri, pinned_versions=[pinned], storage_options=opts, retention_hours=0)
    assert result.files_compacted == 3 and result.vacuum_skipped is None
    again = sorted_rows(read_table(uri, version=pinned, storage_options=opts), "_row_id")
    assert again == ours == sorted_rows(read_delta(blob_fs, path, pinned), "_row_id")


def _race(uri: str, opts: dict, token: str, barrier, results) -> None:
    data = rows(0, 50_000)
    barrier.wait()
    outcome = append(uri, data, "unit-race", opts, token=token)
    results.put((outcome.committed, outcome.reason))


def test_racing_writers_on_azure_commit_once(azurite, container):
    opts, uri = options(azurite), f"az://{container}/t"
    ensure_table(uri, schema=SCHEMA, storage_options=opts)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = [(uri, dict(opts), f"w{i}", barrier, results) for i in range(2)]
    procs = [ctx.Process(target=_race, args=a) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert [c for c, _ in outcomes] == [False, True]
    assert read_table(uri, storage_options=opts).num_rows == 50_000


def _commit_through(uri: str, opts: dict, results) -> None:
    outcome = append(uri, rows(0, 7), "unit-lost", opts, token="writer-1")
    results.put((outcome.committed, outcome.table_version, outcome.reason))


def test_a_lost_commit_reply_is_recognised_as_the_writers_own(azurite, container):
    """Azurite stores the commit; the reply never arrives; delta-rs' retry finds the version
    taken and reports a conflict. The writer must call it its own, not another writer's."""
    direct, uri = options(azurite), f"az://{container}/t"
    ensure_table(uri, schema=SCHEMA, storage_options=direct)
    proxy = TcpProxy(azurite.port)
    try:
        proxy.lose_response_to(b"_delta_log/00000000000000000001.json", method=b"PUT")
        ctx = mp.get_context("spawn")  # the writer outside this process: the proxy keeps the GIL
        results = ctx.Queue()
        writer = ctx.Process(
            target=_commit_through, args=(uri, options(azurite, proxy.port), results)
        )
        writer.start()
        writer.join(120)
        assert writer.exitcode == 0 and proxy.lost_responses == 1
    finally:
        proxy.close()
    committed, version, reason = results.get(timeout=5)
    assert (committed, version) == (True, 1) and "reply was lost" in reason
    assert latest_version(uri, storage_options=direct) == 1
    assert read_table(uri, storage_options=direct).num_rows == 7


def test_commit_files_written_by_other_processes_on_azure(azurite, container, blob_fs):
    opts, uri, path = options(azurite), f"az://{container}/silver", f"{container}/silver"
    adds = []
    for i in range(2):
        rel = f"part-{i}-attempt-0.parquet"
        pq.write_table(rows(i * 10, 10), f"{path}/{rel}", filesystem=blob_fs)
        adds.append(AddedFile(rel, blob_fs.get_file_info(f"{path}/{rel}").size, 10))
    kw = {"schema": SCHEMA, "app_id": "batch-1", "version": 1, "metadata": {}}
    assert commit_files(uri, adds, writer_token="d1", storage_options=opts, **kw).committed
    assert not commit_files(uri, adds, writer_token="d2", storage_options=opts, **kw).committed
    assert sorted_rows(read_delta(blob_fs, path), "_row_id") == sorted_rows(
        read_table(uri, storage_options=opts), "_row_id"
    )
    with pytest.raises(TableError, match="storage has missing"):
        commit_files(
            uri,
            [AddedFile("gone.parquet", 5, 1)],
            writer_token="d3",
            storage_options=opts,
            **{**kw, "app_id": "batch-2"},
        )


def test_sas_token_works_and_errors_show_no_credential(azurite, container):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        azurite.account,
        container,
        account_key=azurite.key,
        permission=ContainerSasPermissions(
            read=True, write=True, list=True, add=True, create=True, delete=True
        ),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    uri = f"az://{container}/sas"
    ensure_table(uri, schema=SCHEMA, storage_options=options(azurite, sas_token=sas))
    assert append(uri, rows(0, 3), "u", options(azurite, sas_token=sas)).committed

    wrong_key = "QUFBQ0FOQVJZS0VZ" + azurite.key[16:]
    bad_sig = sas.replace("sig=", "sig=CANARY")
    cases = [
        (options(azurite, account_key=wrong_key), "refused the credentials", False),
        (options(azurite, sas_token=bad_sig), "refused the credentials", False),
        (options(azurite, port=_closed_port(), timeout_seconds=2), "unreachable", True),
    ]
    for opts, message, retryable in cases:
        for call in (
            lambda o=opts: ensure_table(uri, schema=SCHEMA, storage_options=o),
            lambda o=opts: append(uri, rows(5, 1), "u2", o),
        ):
            with pytest.raises(TableError, match=message) as err:
                call()
            text = str(err.value) + repr(err.value.__cause__) + repr(err.value.__context__)
            assert uri in text and err.value.retryable is retryable
            for secret in (wrong_key, bad_sig, "CANARY", azurite.key, sas.split("sig=")[1]):
                assert secret not in text
    with pytest.raises(TableError, match="container .* does not exist"):
        ensure_table(
            f"az://nope-{uuid.uuid4().hex[:8]}/t", schema=SCHEMA, storage_options=options(azurite)
        )
    assert read_table(uri, storage_options=options(azurite)).num_rows == 3


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
