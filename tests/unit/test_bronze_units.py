"""Unit tests for tasks.bronze.ingest (plain functions, real `datasets` and pyarrow)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tasks.bronze import ingest as bronze
from tasks.bronze import sources
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.delta import TableError, read_version
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import SourceParams


def _rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "text": f"document {i} " + "mot " * (i % 7 + 3),
            "url": f"https://e.x/{i}",
            "timestamp": "2021-01-01",
            "source": "mC4",
        }
        for i in range(start, start + n)
    ]


def _ingest(lake, path, *, max_rows=None, text_column="text", work=None):
    units = sources.resolve_units("json", None, str(path), "train", None, None, lake)
    assert len(units) == 1
    source = SourceParams(dataset="json", data_files=str(path), text_column=text_column)
    return bronze.ingest_source_unit(
        lake,
        units[0],
        source=source,
        dataset_key="json",
        language="xx",
        token=None,
        max_rows=max_rows,
        parameters={"source.dataset": "json"},
        work_dir=work,
    )


def _read(lake, outcome):
    """The committed rows of one unit's batch, read back from the Delta table."""
    rows = read_version(lake.table_uri(bronze_dir("json", "xx")), storage_options={})
    return [rows.filter(pc.equal(rows.column("_batch_id"), outcome.batch_id))]


def test_lineage_columns_and_source_columns_unchanged(tmp_path, jsonl_factory):
    src = jsonl_factory("a.jsonl", _rows(25))
    lake = open_lakehouse(str(tmp_path / "lake"))
    manifest = _ingest(lake, src, work=tmp_path)
    assert manifest.committed and manifest.rows == 25
    tables = _read(lake, manifest)
    names = tables[0].column_names
    assert names == ["text", "url", "timestamp", "source", *bronze.LINEAGE_COLUMNS]
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["text"] for r in rows] == [r["text"] for r in _rows(25)]
    assert {r["_batch_id"] for r in rows} == {manifest.batch_id}
    assert {r["_source_file"] for r in rows} == {str(src.resolve())}
    assert len({r["_row_id"] for r in rows}) == 25
    assert str(tables[0].schema.field("_ingested_at").type) == "timestamp[us, tz=UTC]"
    assert {r["_source_version"] for r in rows} == {f"sha256:{sources.sha256_file(src)}"}
    [batch] = committed_batches(lake, bronze_dir("json", "xx"))
    assert (batch.batch_id, batch.rows) == (manifest.batch_id, 25)
    assert batch.version == manifest.table_version == 1  # version 0 creates the table


def test_row_ids_are_stable_across_runs_and_roots(tmp_path, jsonl_factory):
    src = jsonl_factory("a.jsonl", _rows(30))
    ids = []
    for root in ("lake1", "lake2"):
        lake = open_lakehouse(str(tmp_path / root))
        manifest = _ingest(lake, src, work=tmp_path)
        ids.append([i for t in _read(lake, manifest) for i in t.column("_row_id").to_pylist()])
    assert ids[0] == ids[1] and len(set(ids[0])) == 30
    # Another file gets other ids.
    other = jsonl_factory("b.jsonl", _rows(30))
    lake = open_lakehouse(str(tmp_path / "lake1"))
    manifest = _ingest(lake, other, work=tmp_path)
    assert not set(ids[0]) & {
        i for t in _read(lake, manifest) for i in t.column("_row_id").to_pylist()
    }


def test_same_unit_commits_once(tmp_path, jsonl_factory):
    src = jsonl_factory("a.jsonl", _rows(5))
    lake = open_lakehouse(str(tmp_path / "lake"))
    first = _ingest(lake, src, work=tmp_path)
    second = _ingest(lake, src, work=tmp_path)
    assert (first.committed, second.committed) == (True, False)
    assert first.batch_id == second.batch_id and second.rows == 5
    assert [b.rows for b in committed_batches(lake, bronze_dir("json", "xx"))] == [5]


def test_max_rows_truncates_and_records_it(tmp_path, jsonl_factory):
    src = jsonl_factory("a.jsonl", _rows(50))
    lake = open_lakehouse(str(tmp_path / "lake"))
    outcome = _ingest(lake, src, max_rows=12, work=tmp_path)
    assert outcome.rows == 12 and len(_read(lake, outcome)[0]) == 12


def test_plan_units_splits_new_done_and_changed(tmp_path, jsonl_factory):
    a = jsonl_factory("in/a.jsonl", _rows(3))
    jsonl_factory("in/b.jsonl", _rows(3, start=3))
    lake = open_lakehouse(str(tmp_path / "lake"))
    _ingest(lake, a, work=tmp_path)
    a.write_text(a.read_text() + '{"text": "appended later"}\n', encoding="utf-8")
    units = sources.resolve_units("json", None, str(tmp_path / "in"), "train", None, None, lake)
    plan = sources.plan_units(lake, "json", "xx", units)
    assert [u.uri.rsplit("/", 1)[-1] for u in plan.todo] == ["b.jsonl"]
    assert plan.changed == [str(a.resolve())] and plan.skipped == []


def test_folder_and_glob_resolve_sorted_units(tmp_path, jsonl_factory):
    for name in ("d/2.jsonl", "d/1.jsonl", "d/sub/3.jsonl"):
        jsonl_factory(name, _rows(1))
    (tmp_path / "d" / ".hidden.jsonl").write_text("x")
    folder = sources.resolve_units("json", None, str(tmp_path / "d"), "train", None, None)
    assert [u.uri.rsplit("/", 1)[-1] for u in folder] == ["1.jsonl", "2.jsonl", "3.jsonl"]
    glob = sources.resolve_units("json", None, str(tmp_path / "d" / "*.jsonl"), "train", None, None)
    assert len(glob) == 2
    # A local path as `dataset` picks the builder from the extension.
    path_units = sources.resolve_units(str(tmp_path / "d"), None, None, "train", None, None)
    assert {u.builder for u in path_units} == {"json"}


# -- bad inputs: each error names the thing and the fix ----------------------------------------
def test_non_utf8_rows_are_kept_with_replacement_char(tmp_path, caplog):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "clean row"}\n')
    lake = open_lakehouse(str(tmp_path / "lake"))
    with caplog.at_level(logging.WARNING, logger="tasks.bronze.ingest"):
        manifest = _ingest(lake, src, work=tmp_path)
    texts = [r for t in _read(lake, manifest) for r in t.column("text").to_pylist()]
    assert texts == ["caf\ufffd au lait", "clean row"]
    assert "latin1.jsonl is not valid UTF-8" in caplog.text and "U+FFFD" in caplog.text


def test_not_json_names_the_file(tmp_path):
    src = tmp_path / "notes.jsonl"
    src.write_text("just some notes\nnot json {\n", encoding="utf-8")
    with pytest.raises(sources.SourceError, match=r"notes\.jsonl: unreadable as json.*real format"):
        _ingest(open_lakehouse(str(tmp_path / "lake")), src, work=tmp_path)


def test_missing_text_column_lists_columns(tmp_path, jsonl_factory):
    src = jsonl_factory("a.jsonl", [{"body": "x", "url": "u"}])
    with pytest.raises(sources.SourceError) as err:
        _ingest(open_lakehouse(str(tmp_path / "lake")), src, work=tmp_path)
    msg = str(err.value)
    assert "no column 'text'" in msg and "['body', 'url']" in msg and "source.text_column" in msg


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_source(tmp_path, content):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(content)
    lake = open_lakehouse(str(tmp_path / "lake"))
    with pytest.raises(sources.SourceError, match=r"empty\.jsonl: empty source"):
        _ingest(lake, src, work=tmp_path)
    assert committed_batches(lake, bronze_dir("json", "xx")) == []


def test_no_matching_files(tmp_path):
    with pytest.raises(sources.SourceError, match="matches no file: check the path or glob"):
        sources.resolve_units("json", None, str(tmp_path / "nope" / "*.jsonl"), "train", None, None)
    with pytest.raises(sources.SourceError, match="needs source.data_files"):
        sources.resolve_units("json", None, None, "train", None, None)


def test_unknown_extension_asks_for_the_format(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.bin").write_bytes(b"\x00")
    with pytest.raises(sources.SourceError, match="data.bin: cannot tell its format"):
        sources.resolve_units(str(tmp_path / "d"), None, None, "train", None, None)


def test_unknown_hub_dataset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sources.SourceError) as err:
        sources.resolve_units("no-such-org/no-such-dataset", "xx", None, "train", None, None)
    msg = str(err.value)
    assert "no-such-org/no-such-dataset" in msg and "Check the name" in msg


def test_unknown_config_lists_the_available_ones(tmp_path, jsonl_factory):
    """A hub-style dataset (configs in README front matter) with a config that is not there."""
    jsonl_factory("ds/fr/train.jsonl", _rows(2))
    (tmp_path / "ds" / "README.md").write_text(
        "---\nconfigs:\n- config_name: fr\n  data_files:\n  - split: train\n"
        "    path: fr/train.jsonl\n---\n",
        encoding="utf-8",
    )
    with pytest.raises(sources.SourceError) as err:
        sources._hub_units(str(tmp_path / "ds"), "xx", "train", None, None, [])
    msg = str(err.value)
    assert "source.name='xx' is not a config" in msg and "['fr']" in msg
    with pytest.raises(sources.SourceError, match=r"source.split='test' not in .*\['train'\]"):
        sources._hub_units(str(tmp_path / "ds"), "fr", "test", None, None, [])
    [unit] = sources._hub_units(str(tmp_path / "ds"), "fr", "train", None, None, [])
    assert unit.builder == "json" and unit.uri.endswith("fr/train.jsonl")


def test_changed_column_type_is_refused_naming_the_file_and_column(tmp_path, jsonl_factory):
    lake = open_lakehouse(str(tmp_path / "lake"))
    _ingest(lake, jsonl_factory("a.jsonl", [{"text": "a b c d", "n": 1}]), work=tmp_path)
    bad = jsonl_factory("b.jsonl", [{"text": "e f g h", "n": "one"}])
    with pytest.raises(TableError, match=r"b\.jsonl.*column 'n' is string but the table has long"):
        _ingest(lake, bad, work=tmp_path)
    # A new nullable column is fine (schema merge); rows stay exactly once.
    _ingest(lake, jsonl_factory("c.jsonl", [{"text": "i j k l", "extra": "x"}]), work=tmp_path)
    assert sum(b.rows for b in committed_batches(lake, bronze_dir("json", "xx"))) == 2


def test_old_layout_folder_is_refused_with_make_clean(tmp_path, jsonl_factory):
    lake = open_lakehouse(str(tmp_path / "lake"))
    old = tmp_path / "lake" / "bronze" / "json" / "xx" / "batch=abc"
    old.mkdir(parents=True)
    (old / "_manifest.json").write_text("{}")
    with pytest.raises(TableError, match="no Delta table.*make clean"):
        _ingest(lake, jsonl_factory("a.jsonl", _rows(2)), work=tmp_path)


_WIDE = [{"text": "x" * 600, "n": i, "f": 1.5, "ok": True, "z": None} for i in range(20_000)]


@pytest.mark.parametrize(
    ("lines", "flat"),
    [
        ([{"text": "héllo", "n": 1, "ok": True, "z": None, "at": "2023-01-01"}] * 5, True),
        (_WIDE + [{"text": "later", "n": 2.5}], True),  # past the first chunk: a float
        (_WIDE + [{"text": "later", "extra": "column"}], True),  # past it: a new column
        ([{"text": "a", "meta": {"k": 1}}, {"text": "b", "meta": {"j": 2}}], False),
        ([{"text": "a", "tags": ["x", "y"]}], False),
        (b'\xef\xbb\xbf{"text": "bom"}\r\n\n{"text": "crlf"}\r\n', True),
        (b'[{"text": "a json array"}]', False),
    ],
)
def test_flat_json_features_give_what_datasets_infers_itself(tmp_path, lines, flat):
    """Features bronze passes to skip the json builder's own inference must change nothing:
    the same rows and types, or the same error, as the builder inferring them."""
    import datasets

    path = tmp_path / "unit.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    features = bronze._flat_json_features(path)
    assert (features is not None) == flat

    def read(features):
        builder = datasets.load_dataset_builder(
            "json", data_files={"train": [str(path)]}, features=features
        )
        try:
            stream = builder.as_streaming_dataset(split="train").with_format("arrow")
            return pa.concat_tables(list(stream.iter(batch_size=10_000)))
        except Exception as exc:  # the same failure either way
            return type(exc).__name__

    inferred, given = read(None), read(features)
    if isinstance(inferred, str):
        assert given == inferred
    else:
        assert given.schema == inferred.schema and given.equals(inferred)
