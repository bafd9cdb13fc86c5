"""Delta table layer on a local folder: exactly once, races, schemas, external files, maintenance.

Real delta-rs on real folders; every table is also read by `tests.delta_reader` (pyarrow only,
no delta-rs) to prove that another engine sees exactly the committed rows.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from tasks.lakehouse.delta_access import AzureAccess, delta_storage_options
from tasks.lakehouse.maintenance import maintain_table
from tasks.lakehouse.tables import (
    TABLE_PROPERTIES,
    AddedFile,
    TableError,
    _after_conflict,  # the conflict decision, tested alone
    append_batch,
    commit_files,
    ensure_table,
    latest_version,
    read_table,
    table_files,
    transaction_version,
)
from tests.delta_reader import read_delta, replay_log, sorted_rows

SCHEMA = pa.schema([("_row_id", pa.string()), ("text", pa.string()), ("n", pa.int64())])
LOCAL = pafs.LocalFileSystem()


def rows(start: int, count: int) -> pa.Table:
    n = pa.array(np.arange(start, start + count, dtype=np.int64))
    digits = pc.cast(n, pa.string())
    row_id = pc.binary_join_element_wise("r", pc.utf8_lpad(digits, 7, "0"), "")
    text = pc.binary_join_element_wise("t", digits, "")
    return pa.table([row_id, text, n], schema=SCHEMA)


def append(uri: str, data: pa.Table, app_id: str, version: int = 1, token: str = "w1", **kw):
    return append_batch(
        uri, data, app_id=app_id, version=version, writer_token=token, metadata={"rows": "x"}, **kw
    )


def assert_readers_agree(uri: str, version: int | None = None) -> list[dict]:
    """deltalake and the pyarrow-only reader return the same rows; returns them."""
    ours = sorted_rows(read_table(uri, version=version), "_row_id")
    assert sorted_rows(read_delta(LOCAL, uri, version), "_row_id") == ours
    return ours


@pytest.fixture
def table(tmp_path) -> str:
    uri = str(tmp_path / "bronze" / "json" / "xx")
    ensure_table(uri, schema=SCHEMA)
    return uri


def test_new_table_has_lowest_protocol_and_long_log_retention(table):
    dt = DeltaTable(table)
    protocol = dt.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features
    assert dt.metadata().configuration == TABLE_PROPERTIES
    ensure_table(table, schema=SCHEMA)  # idempotent
    assert latest_version(table) == 0 and read_delta(LOCAL, table).num_rows == 0


def test_all_null_columns_and_nanosecond_timestamps_keep_the_lowest_protocol(tmp_path):
    uri, ts = str(tmp_path / "t"), pa.timestamp("ns", tz="UTC")
    data = pa.table({"at": pa.array([1_000_000_000], ts), "empty": pa.nulls(1)})
    ensure_table(uri, schema=data.schema)
    assert append(uri, data, "u").committed
    protocol = DeltaTable(uri).protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    stored = pa.schema([("at", pa.timestamp("us", "UTC")), ("empty", pa.string())])
    assert read_table(uri).schema == stored
    later = pa.table({"at": pa.array([2_000_000_000], ts), "empty": pa.array([7])})
    with pytest.raises(TableError, match="column 'empty' is long but the table has string"):
        append(uri, later, "u2")


def test_append_commits_once_and_a_rerun_does_nothing(table):
    first = append(table, rows(0, 5), "unit-a")
    assert (first.committed, first.table_version) == (True, 1)
    again = append(table, rows(0, 5), "unit-a", token="w2")  # another run, same unit
    assert not again.committed and again.reason.startswith("already committed")
    assert transaction_version(table, "unit-a") == 1 and latest_version(table) == 1
    assert len(assert_readers_agree(table)) == 5
    info = DeltaTable(table).history(1)[0]
    assert json.loads(info["userMetadata"]) == {"rows": "x"}


@pytest.mark.parametrize("row_group_rows", [None, 4])
def test_appended_files_are_compressed_with_bounded_row_groups(table, row_group_rows):
    assert append(table, rows(0, 10), "unit-z", row_group_rows=row_group_rows).committed
    [part] = [Path(table) / f for f in DeltaTable(table).file_uris()]
    meta = pq.ParquetFile(part).metadata
    assert meta.num_row_groups == (3 if row_group_rows else 1)
    codecs = {
        meta.row_group(g).column(c).compression
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    }
    assert codecs == {"SNAPPY"}


def test_chunk_k_commits_only_after_chunk_k_minus_1(table):
    with pytest.raises(ValueError, match="must follow commit 1"):
        append(table, rows(10, 2), "unit-b", version=2)
    assert latest_version(table) == 0
    assert append(table, rows(0, 2), "unit-b", version=1).committed
    assert append(table, rows(10, 2), "unit-b", version=2).committed
    assert not append(table, rows(0, 2), "unit-b", version=1, token="w9").committed
    assert transaction_version(table, "unit-b") == 2
    assert transaction_version(table, "never") == 0
    assert len(assert_readers_agree(table)) == 4


def test_a_retry_after_an_unanswered_commit_recognises_its_own_commit(table):
    """The first call committed but its caller never heard (crash, lost reply): same token."""
    append(table, rows(0, 3), "unit-c", token="attempt-1")  # outcome lost
    retry = append(table, rows(0, 3), "unit-c", token="attempt-1")
    assert retry.committed and retry.table_version == 1
    assert retry.reason == "committed earlier by this writer"
    assert len(assert_readers_agree(table)) == 3


def _race(uri: str, token: str, barrier, results) -> None:
    data = rows(0, 50_000)  # writing takes long enough that every writer passes the gate
    barrier.wait()
    outcome = append(uri, data, "unit-race", token=token)
    results.put((token, outcome.committed, outcome.reason))


def test_racing_writers_commit_once_and_the_losers_report_done(table):
    ctx = mp.get_context("spawn")  # delta-rs cannot run in a forked child
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(table, f"w{i}", barrier, results)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = [results.get(timeout=5) for _ in procs]
    assert sum(committed for _, committed, _ in outcomes) == 1
    # The loser met the winner's commit as a conflict (both passed the gate) or, on a slow
    # machine, at the gate; either way it reports the unit done and does not crash.
    [loser] = [r for _, committed, r in outcomes if not committed]
    assert loser == "committed by another writer" or loser.startswith("already committed")
    assert len(assert_readers_agree(table)) == 50_000
    # The losers' data files stay (never deleted after a conflict) but no commit names them.
    assert len([f for f in os.listdir(table) if f.endswith(".parquet")]) > len(
        table_files(table, version=latest_version(table))
    )


def test_after_a_conflict_the_writer_token_tells_own_commit_from_another_writers(table):
    """The decision a conflicting writer makes, without the timing of a real race."""
    append(table, rows(0, 3), "unit-d", token="winner")
    kw = {"storage_options": None, "app_id": "unit-d", "version": 1, "read_version": 0}
    mine = _after_conflict(table, token="winner", **kw)
    assert mine.committed and mine.table_version == 1 and "reply was lost" in mine.reason
    theirs = _after_conflict(table, token="loser", **kw)
    assert not theirs.committed and theirs.reason == "committed by another writer"
    assert _after_conflict(table, token="x", **{**kw, "app_id": "unit-e"}) is None  # retry


def test_an_old_layout_folder_is_refused_and_left_as_it_is(tmp_path):
    uri = tmp_path / "bronze" / "json" / "xx"
    (uri / "batch=abc").mkdir(parents=True)
    (uri / "batch=abc" / "_manifest.json").write_text("{}")
    with pytest.raises(TableError, match="make clean") as err:
        ensure_table(str(uri), schema=SCHEMA)
    assert str(uri) in str(err.value)
    assert not (uri / "_delta_log").exists()
    with pytest.raises(TableError, match="No Delta table"):
        append(str(uri), rows(0, 1), "u")


def test_schema_merge_takes_a_new_nullable_column(table):
    append(table, rows(0, 2), "u1", schema_mode="merge")
    wider = rows(2, 2).append_column("lang", pa.array(["fr", "de"]))
    stream = pa.RecordBatchReader.from_batches(wider.schema, wider.to_batches())
    assert append(table, stream, "u2", schema_mode="merge").committed
    got = assert_readers_agree(table)
    assert [r["lang"] for r in got] == [None, None, "fr", "de"]
    fixed = str(Path(table).parent / "fixed")  # a fixed-schema table (silver) refuses it
    ensure_table(fixed, schema=SCHEMA)
    with pytest.raises(TableError, match="'lang' is not in the table"):
        append(fixed, wider, "u3")


def test_a_changed_column_type_is_refused_naming_the_column(table):
    append(table, rows(0, 2), "u1")
    as_text = rows(2, 2).set_column(2, "n", pa.array(["2", "3"]))
    with pytest.raises(TableError, match="column 'n' is string but the table has long"):
        append(table, as_text, "u2", schema_mode="merge")
    narrow = rows(4, 2).set_column(2, "n", pa.array([4, 5], pa.int32()))
    assert append(table, narrow, "u3").committed  # integers widen into the table's type
    with pytest.raises(TableError, match="column 'n'"):
        ensure_table(table, schema=as_text.schema)
    with pytest.raises(TableError, match="differing: \\['extra'\\]"):
        ensure_table(table, schema=SCHEMA.append(pa.field("extra", pa.string())))
    assert latest_version(table) == 2


def _write_part(uri: str, rel: str, data: pa.Table) -> AddedFile:
    path = Path(uri) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, path)
    return AddedFile(path=rel, size=path.stat().st_size, rows=data.num_rows)


def test_commit_files_commits_parts_written_by_other_processes(tmp_path):
    uri = str(tmp_path / "silver")
    adds = [_write_part(uri, f"part-{i}-attempt-0.parquet", rows(i * 10, 10)) for i in range(3)]
    _write_part(uri, "part-9-attempt-0.parquet", rows(90, 10))  # a failed task's leftover
    kw = {"schema": SCHEMA, "writer_token": "driver-1", "metadata": {"batch": "b1"}}
    outcome = commit_files(uri, adds, app_id="batch-1", version=1, **kw)
    assert outcome.committed and outcome.table_version == 1
    rerun = commit_files(uri, adds, app_id="batch-1", version=1, **{**kw, "writer_token": "x"})
    assert not rerun.committed
    assert [r["n"] for r in assert_readers_agree(uri)] == list(range(30))
    assert DeltaTable(uri).get_add_actions(flatten=True).column("num_records").to_pylist() == [
        10,
        10,
        10,
    ]
    partial = _write_part(uri, "part-5-attempt-0.parquet", rows(50, 10))
    bad = [
        (AddedFile("part-5-attempt-0.parquet", partial.size + 1, 10), "storage has"),
        (AddedFile("part-5-attempt-0.parquet", partial.size, 11), "the file has 10"),
        (AddedFile("missing.parquet", 10, 1), "storage has missing"),
        (AddedFile("../outside.parquet", 10, 1), "not a data file path"),
        (AddedFile("_delta_log/x.parquet", 10, 1), "not a data file path"),
    ]
    for add, message in bad:
        with pytest.raises(TableError, match=message):
            commit_files(uri, [add], app_id="batch-2", version=1, **kw)
    other = _write_part(uri, "part-6.parquet", rows(60, 1).set_column(2, "n", pa.array(["6"])))
    with pytest.raises(TableError, match="column 'n' is string"):
        commit_files(uri, [other], app_id="batch-3", version=1, **kw)
    assert latest_version(uri) == 1


def test_commit_files_into_a_partitioned_table(tmp_path):
    uri = str(tmp_path / "t")
    schema = SCHEMA.append(pa.field("lang", pa.string()))
    ensure_table(uri, schema=schema, partition_by=["lang"])
    adds = [
        AddedFile(
            **{
                **vars(_write_part(uri, f"lang={lg}/part-0.parquet", rows(i, 2))),
                "partition_values": {"lang": lg},
            }
        )
        for i, lg in ((0, "fr"), (5, "de"))
    ]
    kw = {"schema": schema, "app_id": "b", "version": 1, "writer_token": "t", "metadata": {}}
    assert commit_files(uri, adds, **kw).committed
    got = assert_readers_agree(uri)
    assert [(r["n"], r["lang"]) for r in got] == [(0, "fr"), (1, "fr"), (5, "de"), (6, "de")]


def test_maintain_keeps_every_pinned_version_loadable(table):
    for i in range(6):
        append(table, rows(i * 10, 10), f"unit-{i}")
    pinned = 3
    before = assert_readers_agree(table, pinned)
    result = maintain_table(table, pinned_versions=[pinned], retention_hours=0)
    assert result.files_compacted == 6 and result.files_written == 1
    assert result.vacuum_skipped is None and result.files_vacuumed == 3  # those of versions 4..6
    assert (
        Path(table) / "_delta_log" / f"{result.checkpoint_version:020d}.checkpoint.parquet"
    ).exists()
    assert sorted_rows(DeltaTable(table, version=pinned).to_pyarrow_table(), "_row_id") == before
    assert assert_readers_agree(table, pinned) == before
    assert len(assert_readers_agree(table)) == 60  # the latest version, through the checkpoint
    assert replay_log(LOCAL, table).version == result.version_after
    with pytest.raises(TableError):  # an unpinned old version lost its files: pinning matters
        read_table(table, version=5)
    again = maintain_table(table, pinned_versions=[pinned], retention_hours=0)
    assert again.files_compacted == 0 and again.files_vacuumed == 0
    with pytest.raises(TableError, match="Pinned versions"):
        maintain_table(table, pinned_versions=[999])


def test_a_table_that_needs_a_newer_protocol_is_refused(table):
    log = Path(table) / "_delta_log" / f"{1:020d}.json"
    protocol = {"minReaderVersion": 3, "minWriterVersion": 7}
    protocol |= {"readerFeatures": ["deletionVectors"], "writerFeatures": ["deletionVectors"]}
    log.write_text(json.dumps({"commitInfo": {}}) + "\n" + json.dumps({"protocol": protocol}))
    for call in (
        lambda: ensure_table(table, schema=SCHEMA),
        lambda: append(table, rows(0, 1), "u"),
    ):
        with pytest.raises(TableError, match="needs Delta reader 3 / writer 7.*deletionVectors"):
            call()


def test_storage_options_never_show_a_credential():
    key, sas, secret = "S3CRETKEY==", "sv=2024&sig=SIGN%2F", "SPSECRET"
    access = AzureAccess(account_name="acct", account_key=key, endpoint="http://127.0.0.1:1/acct")
    opts = delta_storage_options(access)
    assert opts == {
        "account_name": "acct",
        "account_key": key,
        "endpoint": "http://127.0.0.1:1/acct",
        "allow_http": "true",
    }
    assert key not in repr(opts) and key not in str(opts) and key not in repr(access)
    assert (
        delta_storage_options(AzureAccess(account_name="a", sas_token="?" + sas))["sas_token"]
        == sas
    )
    sp = delta_storage_options(
        AzureAccess(account_name="a", client_id="c", client_secret=secret, tenant_id="t")
    )
    assert sp["client_secret"] == secret and secret not in repr(sp)
    assert delta_storage_options(AzureAccess(account_name="a", use_azure_cli=True)) == {
        "account_name": "a",
        "use_azure_cli": "true",
    }
    assert delta_storage_options(None) == {}
    with pytest.raises(ValueError, match="holds a credential"):
        append_batch(
            f"/tmp/{uuid.uuid4().hex}",
            rows(0, 1),
            app_id="u",
            version=1,
            writer_token="t",
            metadata={"note": f"key={key}"},
            storage_options=opts,
        )
