"""Silver with real Spark (local[2]) on a local lakehouse: ids, dedupe, increments, crashes."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tasks.bronze import ingest as bronze
from tasks.bronze import sources
from tasks.lakehouse.batches import Batch, committed_batches
from tasks.lakehouse.delta import (
    BATCH_META,
    append_batch,
    latest_version,
    live_files,
    open_table,
    read_version,
    transaction_version,
)
from tasks.lakehouse.layout import bronze_dir
from tasks.lakehouse.storage import open_lakehouse
from tasks.params import SourceParams
from tasks.silver.cleaning import REASONS, CleaningRules
from tasks.silver.job import build_silver
from tasks.silver.plan import (
    SilverError,
    SilverJob,
    check_columns,
    open_tokenizer,
    plan_silver,
    silver_app_id,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
DS, LANG = "json", "xx"
RULES = CleaningRules(min_chars=20, max_chars=20_000)


def sample_texts(*langs: str) -> list[str]:
    out = []
    for lang in langs:
        with open(SAMPLE / "culturax" / f"{lang}.jsonl", encoding="utf-8") as fh:
            out += [json.loads(line)["text"] for line in fh]
    return out


def ingest(
    lake,
    path: Path,
    *,
    target: str | None = None,
    text: str = "text",
    language: str = LANG,
) -> list[bronze.UnitOutcome]:
    """Bronze batches for new files under `path` (the bronze layer's own functions)."""
    units = sources.resolve_units("json", None, str(path), "train", None, None, lake)
    plan = sources.plan_units(lake, DS, language, units)
    work = path.parent / "bronze-work"
    work.mkdir(exist_ok=True)
    source = SourceParams(
        dataset="json", data_files=str(path), text_column=text, target_column=target
    )
    out = []
    for unit in plan.todo:
        outcome = bronze.ingest_source_unit(
            lake,
            unit,
            source=source,
            dataset_key=DS,
            language=language,
            token=None,
            max_rows=None,
            parameters={},
            work_dir=work,
        )
        assert outcome.committed
        out.append(outcome)
    return out


def run_silver(
    lake,
    tokenizer: str,
    spark,
    tmp_path: Path,
    job: SilverJob | None = None,
    on_commit=None,
    language: str = LANG,
):
    _, info = open_tokenizer(tokenizer, None, language)
    plan = plan_silver(lake, DS, language, info)
    job = job or SilverJob(rules=RULES)
    check_columns(lake, plan, job.text_column, job.target_column)
    return plan, build_silver(lake, plan, spark, job, {"test": True}, on_commit)


def read_table(lake, table: str) -> tuple[list[Batch], pa.Table | None]:
    """The committed batches of a Delta table and its rows (latest version)."""
    batches = committed_batches(lake, table)
    if latest_version(lake.table_uri(table), storage_options=lake.storage_options) is None:
        return batches, None
    return batches, read_version(lake.table_uri(table), storage_options=lake.storage_options)


def commits(lake, table: str) -> list[dict]:
    """The batch commits of a table (history entries with a batch id), oldest first."""
    t = open_table(lake.table_uri(table), storage_options=lake.storage_options)
    if t is None:
        return []
    return sorted((e for e in t.history() if e.get(BATCH_META)), key=lambda e: e["version"])


def check_invariants(lake, plan, language: str = LANG) -> tuple[pa.Table, pa.Table]:
    """Every bronze row is in silver or rejected, once; silver has no duplicate text; each
    bronze batch's silver and rejected rows were committed once, under its transaction."""
    bronze_table = bronze_dir(DS, language)
    bronze_batches = committed_batches(lake, bronze_table)
    _, bronze_rows = read_table(lake, bronze_table)
    bronze_ids = bronze_rows.column("_row_id").to_pylist()
    _, good = read_table(lake, plan.table)
    _, bad = read_table(lake, plan.rejected_table)
    good_ids = good.column("_row_id").to_pylist() if good is not None else []
    bad_ids = bad.column("_row_id").to_pylist() if bad is not None else []
    assert sorted(good_ids + bad_ids) == sorted(bronze_ids)
    assert len(set(good_ids + bad_ids)) == len(bronze_ids)
    silver_commits = commits(lake, plan.table)
    rejected_commits = commits(lake, plan.rejected_table)
    # One silver and one rejected commit per processed bronze batch, never two.
    for entries in (silver_commits, rejected_commits):
        parents = [e["lakehouse.bronze_batch_id"] for e in entries]
        assert len(parents) == len(set(parents))
    assert [e[BATCH_META] for e in silver_commits] == [e[BATCH_META] for e in rejected_commits]
    by_bronze = {b.batch_id: b.rows for b in bronze_batches}
    for s in silver_commits:
        bid, parent = s[BATCH_META], s["lakehouse.bronze_batch_id"]
        counts = json.loads(s["lakehouse.rejected"])
        for name, table in (("silver", plan.table), ("rejected", plan.rejected_table)):
            assert (
                transaction_version(
                    lake.table_uri(table),
                    silver_app_id(parent),
                    storage_options=lake.storage_options,
                )
                == 1
            ), (name, parent)
        n_good = good.column("_batch_id").to_pylist().count(bid) if good is not None else 0
        rejected_rows = (
            bad.filter(pc.equal(bad.column("_batch_id"), bid)) if bad is not None else None
        )
        n_bad = rejected_rows.num_rows if rejected_rows is not None else 0
        assert n_good + n_bad == by_bronze.get(parent, 0)
        assert sum(counts.values()) == n_bad
        if n_bad:
            assert dict(Counter(rejected_rows.column("reason").to_pylist())) == counts
    if good is not None:
        hashes = good.column("_text_hash").to_pylist()
        assert len(hashes) == len(set(hashes))
    if bad is not None:
        assert set(bad.column("reason").to_pylist()) <= set(REASONS)
    return good, bad


def test_token_ids_equal_the_tokenizer_for_every_row(spark, tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    src = tmp_path / "src"
    src.mkdir()
    texts = sample_texts("fr", "de", "pt")
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ingest(lake, src)
    tok_path = str(tiny_models["t5"])
    plan, outcomes = run_silver(lake, tok_path, spark, tmp_path)
    assert len(outcomes) == 1 and outcomes[0].committed
    assert outcomes[0].version == latest_version(
        lake.table_uri(plan.table), storage_options=lake.storage_options
    )
    good, bad = check_invariants(lake, plan)
    assert good.num_rows > 0.8 * len(texts)

    tok, info = open_tokenizer(tok_path)
    got = good.column("input_ids").to_pylist()
    want = [tok(t)["input_ids"] for t in good.column("text").to_pylist()]
    assert got == want  # every row, exactly
    assert good.column("num_tokens").to_pylist() == [len(x) for x in want]
    assert good.column("_row_id").to_pylist() == sorted(good.column("_row_id").to_pylist())
    assert good.schema.field("input_ids").type == pa.list_(pa.field("element", pa.int32()))
    [commit] = commits(lake, plan.table)
    assert commit["lakehouse.tokenizer_fingerprint"] == info.fingerprint
    assert commit["lakehouse.tokenizer"] == tok_path
    assert commit["lakehouse.bronze_batch_id"] == outcomes[0].bronze_batch_id
    assert commit["lakehouse.bronze_version"] == str(plan.bronze_version)
    [batch] = committed_batches(lake, plan.table)
    assert batch.batch_id == outcomes[0].batch_id and batch.rows == good.num_rows
    assert batch.parents == (outcomes[0].bronze_batch_id,)
    assert plan.table.endswith(info.key) and info.key.startswith("tiny-t5-")


def test_dedupe_across_batches_reruns_and_increments(spark, tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    tok = str(tiny_models["t5"])
    texts = sample_texts("en", "es")
    src = tmp_path / "src"
    src.mkdir()
    old = texts[:400]
    (src / "1-old.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in old))
    [old_bronze] = ingest(lake, src)
    plan, first = run_silver(lake, tok, spark, tmp_path)
    good_old, _ = check_invariants(lake, plan)
    keeper = {
        h: r
        for h, r in zip(
            good_old.column("_text_hash").to_pylist(),
            good_old.column("_row_id").to_pylist(),
            strict=True,
        )
    }

    # New batch: 50 rows repeat old ones (with different whitespace), 20 repeat each other.
    new_rows = texts[400:540] + [t.replace(" ", "  ", 1) for t in old[:50]] + texts[400:420]
    (src / "2-new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in new_rows))
    [new_bronze] = ingest(lake, src)
    opts = lake.storage_options
    old_version = latest_version(lake.table_uri(plan.table), storage_options=opts)
    old_files = live_files(lake.table_uri(plan.table), storage_options=opts)
    old_bytes = {f: Path(f.removeprefix("file://")).read_bytes() for f in old_files}
    plan2, second = run_silver(lake, tok, spark, tmp_path)
    assert [m.batch_id for m in plan2.pending] == [new_bronze.batch_id]  # only the new batch
    assert plan2.done == [old_bronze.batch_id]
    assert [o.bronze_batch_id for o in second] == [new_bronze.batch_id]
    good, bad = check_invariants(lake, plan2)
    dups = [
        r
        for r in bad.to_pylist()
        if r["reason"] == "duplicate" and r["_bronze_batch_id"] == new_bronze.batch_id
    ]
    assert second[0].rejected.get("duplicate", 0) == len(dups)
    old_ids = set(keeper.values())
    across = [d for d in dups if d["duplicate_of"] in old_ids]
    within = [d for d in dups if d["duplicate_of"].startswith(new_bronze.batch_id)]
    assert len(across) >= 45 and len(within) >= 18  # a few may be rejected for other reasons
    assert len(across) + len(within) == len(dups)
    for d in within:  # the keeper is the smallest row id among the copies
        assert d["duplicate_of"] < d["_row_id"]
    # Committed silver is never rewritten: the old version's files are still live, unchanged,
    # and the old version still reads back the same rows.
    assert set(old_files) <= set(live_files(lake.table_uri(plan.table), storage_options=opts))
    for f, data in old_bytes.items():
        assert Path(f.removeprefix("file://")).read_bytes() == data
    again = read_version(lake.table_uri(plan.table), storage_options=opts, version=old_version)
    assert again.sort_by("_row_id").equals(good_old.sort_by("_row_id"))

    # Nothing new: nothing to do, nothing committed (no new version, no new file).
    def state():
        return {
            t: (
                latest_version(lake.table_uri(t), storage_options=opts),
                sorted(
                    p.relative_to(lake.local_path(t)).as_posix()
                    for p in lake.local_path(t).rglob("*")
                ),
            )
            for t in (plan.table, plan.rejected_table)
        }

    before = state()
    plan3, third = run_silver(lake, tok, spark, tmp_path)
    assert plan3.pending == [] and third == []
    assert state() == before

    # 10% new bronze: only that 10% is read and processed.
    rng = random.Random(0)
    extra = sample_texts("it")[:54]
    rng.shuffle(extra)
    (src / "3-ten-percent.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    [tenth] = ingest(lake, src)
    plan4, fourth = run_silver(lake, tok, spark, tmp_path)
    assert [m.batch_id for m in plan4.pending] == [tenth.batch_id]
    assert sum(m.rows for m in plan4.pending) == 54
    assert [o.bronze_rows for o in fourth] == [54]
    check_invariants(lake, plan4)
    silver_batches = committed_batches(lake, plan.table)
    assert {b.batch_id for b in silver_batches} == {o.batch_id for o in first + second + fourth}
    # Oldest commit first, one version per batch.
    assert [b.parents for b in silver_batches] == [
        (old_bronze.batch_id,),
        (new_bronze.batch_id,),
        (tenth.batch_id,),
    ]
    versions = [b.version for b in silver_batches]
    assert versions == sorted(set(versions)) and versions[0] >= 0
    assert versions[-1] == latest_version(lake.table_uri(plan.table), storage_options=opts)
    assert [o.version for o in first + second + fourth] == versions


def _rows_of(lake, table: str) -> dict[str, list[dict]]:
    """batch id -> its rows (sorted by _row_id), from the latest version."""
    _, rows = read_table(lake, table)
    out: dict[str, list[dict]] = {}
    for r in rows.sort_by("_row_id").to_pylist() if rows is not None else []:
        out.setdefault(r["_batch_id"], []).append(r)
    return out


def _snapshot(lake, plan) -> dict[str, object]:
    """What is committed: per table and batch, its counts, parents and rows (not file names:
    Delta names its own files, so a re-run writes the same rows under other names)."""
    out = {}
    for table in (plan.table, plan.rejected_table):
        rows = _rows_of(lake, table)
        for e in commits(lake, table):
            bid = e[BATCH_META]
            out[f"{table}/{bid}"] = (
                e["lakehouse.bronze_batch_id"],
                e["lakehouse.rejected"],
                e["lakehouse.params_key"],
                rows.get(bid, []),
            )
    return out


class Crash(Exception):
    """Stands in for a process dying at a given point."""


def test_killed_run_then_rerun_equals_a_clean_run(spark, tiny_models, tmp_path):
    tok = str(tiny_models["t5"])
    texts = sample_texts("nl", "fr")
    files = {
        "a.jsonl": texts[:250],
        "b.jsonl": texts[200:450] + texts[:30],
        "c.jsonl": texts[440:640] + texts[100:120],
    }
    src = tmp_path / "src"
    src.mkdir()
    clean_lake = open_lakehouse(str(tmp_path / "clean" / "lake"))
    for fname, rows in files.items():  # three bronze batches, committed in this order
        (src / fname).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        ingest(clean_lake, src / fname)
    # The same bronze table (ids, versions) in a second lakehouse.
    shutil.copytree(
        tmp_path / "clean" / "lake" / "bronze", tmp_path / "crashed" / "lake" / "bronze"
    )
    lakes = {"clean": clean_lake, "crashed": open_lakehouse(str(tmp_path / "crashed" / "lake"))}

    plan_clean, _ = run_silver(lakes["clean"], tok, spark, tmp_path / "clean")

    lake = lakes["crashed"]
    events = []

    def die_after_batch_1(stage: str, batch_id: str) -> None:
        events.append(stage)
        if events == ["rejected", "silver", "rejected"]:
            raise Crash("killed after batch 2's rejected commit, before its silver commit")

    with pytest.raises(Crash):
        run_silver(lake, tok, spark, tmp_path / "crashed", on_commit=die_after_batch_1)
    _, info = open_tokenizer(tok)
    partial = plan_silver(lake, DS, LANG, info)
    # The hard case: batch 2's rejected rows are committed, its silver rows are not.
    assert len(partial.done) == 1 and len(partial.pending) == 2
    batch2 = partial.pending[0].batch_id
    assert len(commits(lake, partial.rejected_table)) == 2
    assert len(commits(lake, partial.table)) == 1
    opts = lake.storage_options
    app2 = silver_app_id(batch2)
    assert transaction_version(lake.table_uri(partial.rejected_table), app2, storage_options=opts)
    assert not transaction_version(lake.table_uri(partial.table), app2, storage_options=opts)
    rejected_version = latest_version(lake.table_uri(partial.rejected_table), storage_options=opts)
    # A killed attempt may also leave stray, unreferenced data files in the table folder.
    stray = lake.local_path(partial.table) / "part-00000-leftover.snappy.parquet"
    pq.write_table(pa.table({"_row_id": ["leftover"], "text": ["garbage"]}), stray)
    (lake.local_path(partial.table) / "part-00001-leftover.snappy.parquet").write_bytes(b"junk")

    plan_after, outcomes = run_silver(lake, tok, spark, tmp_path / "crashed")
    assert len(outcomes) == 2 and all(o.committed for o in outcomes)
    assert outcomes[0].bronze_batch_id == batch2
    # Batch 2's rejected rows were not committed again: one more rejected commit (batch 3).
    assert (
        latest_version(lake.table_uri(partial.rejected_table), storage_options=opts)
        == rejected_version + 1
    )
    assert _snapshot(lake, plan_after) == _snapshot(lakes["clean"], plan_clean)
    assert len(_snapshot(lake, plan_after)) == 6  # 3 batches x (silver, rejected)
    check_invariants(lake, plan_after)

    # Same again: nothing to do.
    assert run_silver(lake, tok, spark, tmp_path / "crashed")[1] == []
    assert (
        len(commits(lake, plan_after.table)) == len(commits(lake, plan_after.rejected_table)) == 3
    )


def test_bad_input_is_quarantined_and_counted(spark, tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    src = tmp_path / "src"
    src.mkdir()
    good = sample_texts("de")[:20]
    with open(src / "mixed.jsonl", "wb") as fh:
        for t in good:
            fh.write((json.dumps({"text": t}) + "\n").encode())
        fh.write(b'{"text": ""}\n')
        fh.write(b'{"text": null}\n')
        fh.write(b'{"other": "no text key at all"}\n')
        fh.write(b'{"text": "\xff\xfe\xfa\xfb\xfc\xfd\xff\xfe\xfa\xfb bytes"}\n')  # not UTF-8
        fh.write((json.dumps({"text": "Lang " * 5000}) + "\n").encode())  # over max_chars
        fh.write(b'{"text": "12345 67890 12345 67890 !!!"}\n')
    [mixed_bronze] = ingest(lake, src)
    # An empty bronze commit (a batch with no rows) must not break silver or be counted.
    bronze_uri = lake.table_uri(bronze_dir(DS, LANG))
    schema = open_table(bronze_uri, storage_options={}).schema()
    schema = pa.schema(schema.to_arrow() if hasattr(schema, "to_arrow") else schema.to_pyarrow())
    assert append_batch(
        bronze_uri,
        schema.empty_table(),
        app_id="emptybatch0000000000",
        version=1,
        metadata={BATCH_META: "emptybatch0000000000"},
        storage_options={},
    ).committed

    plan, outcomes = run_silver(lake, str(tiny_models["t5"]), spark, tmp_path)
    assert {o.bronze_batch_id for o in outcomes} <= {"emptybatch0000000000", mixed_bronze.batch_id}
    for o in outcomes:
        if o.bronze_batch_id == "emptybatch0000000000":
            assert (o.rows, o.rejected) == (0, {})
    [mixed] = [o for o in outcomes if o.bronze_batch_id == mixed_bronze.batch_id]
    assert mixed.bronze_rows == len(good) + 6
    assert mixed.rejected == {
        "bad_encoding": 1,
        "empty": 1,
        "low_letter_ratio": 1,
        "null_text": 2,
        "too_long": 1,
    }
    assert mixed.rows == len(good)
    _, bad = check_invariants(lake, plan)
    long_row = bad.filter(pc.equal(bad.column("reason"), "too_long")).to_pylist()[0]
    assert len(long_row["text"]) <= 1001 and "max_chars" in long_row["detail"]
    # Re-run: nothing pending, the empty batch included.
    assert run_silver(lake, str(tiny_models["t5"]), spark, tmp_path)[1] == []


def test_pairs_get_labels_and_null_targets_are_rejected(spark, tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    src = tmp_path / "src"
    src.mkdir()
    with open(SAMPLE / "pairs" / "en-fr.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh][:150]
    rows += [
        {"source": "A perfectly fine English source sentence.", "target": None},
        {"source": "Another perfectly fine English source here.", "target": "  "},
    ]
    (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Language "en-fr": mBART's sources end with `</s> en_XX`, targets with `</s> fr_XX`.
    ingest(lake, src, target="target", text="source", language="en-fr")
    tok_path = str(tiny_models["mbart"])
    job = SilverJob(
        text_column="source",
        target_column="target",
        rules=CleaningRules(min_chars=1, min_letter_ratio=0.0),
    )
    plan, [outcome] = run_silver(lake, tok_path, spark, tmp_path, job=job, language="en-fr")
    assert outcome.rejected.get("null_target") == 2
    good, _ = check_invariants(lake, plan, "en-fr")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path, src_lang="en_XX", tgt_lang="fr_XX")
    assert good.column("labels").to_pylist() == [
        tok(text_target=t)["input_ids"] for t in good.column("target").to_pylist()
    ]
    assert good.column("input_ids").to_pylist() == [
        tok(t)["input_ids"] for t in good.column("text").to_pylist()
    ]
    codes = tok.convert_tokens_to_ids(["en_XX", "fr_XX"])
    assert {ids[-1] for ids in good.column("input_ids").to_pylist()} == {codes[0]}
    assert {ids[-1] for ids in good.column("labels").to_pylist()} == {codes[1]}
    # The table is still the model tokenizer's (same fingerprint as without language codes).
    assert plan.tokenizer.key == open_tokenizer(tok_path)[1].key
    [commit] = commits(lake, plan.table)
    assert (commit["lakehouse.tokenizer_src_lang"], commit["lakehouse.tokenizer_tgt_lang"]) == (
        "en_XX",
        "fr_XX",
    )


def test_missing_column_and_bad_tokenizer_are_clear_errors(tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"body": "some text here", "id": 1}) + "\n")
    ingest(lake, src, text="body")
    _, info = open_tokenizer(str(tiny_models["t5"]))
    plan = plan_silver(lake, DS, LANG, info)
    with pytest.raises(SilverError, match=r"no column 'text' \(source.text_column\).*'body'"):
        check_columns(lake, plan, "text", None)
    with pytest.raises(SilverError, match="model.name_or_path"):
        open_tokenizer(str(tmp_path / "no-such-model"))
    # Data files no commit references are not pending (a crashed bronze attempt's leftovers).
    stray = lake.local_path(bronze_dir(DS, LANG)) / "part-00000-uncommitted.snappy.parquet"
    pq.write_table(
        pa.table({"body": ["x"], "_row_id": ["u-0"], "_batch_id": ["uncommitted"]}), stray
    )
    again = plan_silver(lake, DS, LANG, info)
    assert [m.batch_id for m in again.pending] == [m.batch_id for m in plan.pending]
    assert [m.rows for m in again.pending] == [1]
