"""Silver with real Spark (local[2]) on a local lakehouse: ids, dedupe, increments, crashes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.bronze import ingest as bronze
from tasks.lakehouse.layout import batch_dir, bronze_dir
from tasks.lakehouse.manifest import Manifest, commit_batch, committed_manifests
from tasks.lakehouse.storage import open_lakehouse
from tasks.silver.cleaning import REASONS, CleaningRules
from tasks.silver.job import (
    SilverError,
    SilverJob,
    build_silver,
    check_columns,
    open_tokenizer,
    plan_silver,
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
    rows_per_part: int = 200,
    language: str = LANG,
) -> list[Manifest]:
    """Bronze batches for new files under `path` (the bronze layer's own functions)."""
    units = bronze.resolve_units("json", None, str(path), "train", None, None, lake)
    plan = bronze.plan_units(lake, DS, language, units)
    work = path.parent / "bronze-work"
    work.mkdir(exist_ok=True)
    out = []
    for unit in plan.todo:
        m, _ = bronze.ingest_unit(
            lake,
            unit,
            dataset_key=DS,
            language=language,
            split="train",
            name=None,
            text_column=text,
            target_column=target,
            token=None,
            rows_per_part=rows_per_part,
            max_rows=None,
            parameters={},
            work_dir=work,
        )
        out.append(m)
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
    check_columns(lake, plan.pending, job.text_column, job.target_column)
    work = tmp_path / "silver-work"
    work.mkdir(exist_ok=True)
    return plan, build_silver(lake, plan, spark, job, work, {"test": True}, on_commit)


def read_table(lake, table: str) -> tuple[list[Manifest], pa.Table | None]:
    manifests = committed_manifests(lake, table)
    files = [str(lake.local_path(p)) for m in manifests for p in m.file_paths()]
    return manifests, (pa.concat_tables([pq.read_table(f) for f in files]) if files else None)


def check_invariants(lake, plan, language: str = LANG) -> tuple[pa.Table, pa.Table]:
    """Every bronze row is in silver or rejected, once; silver has no duplicate text."""
    bronze_ms = committed_manifests(lake, bronze_dir(DS, language))
    silver_ms, good = read_table(lake, plan.table)
    rejected_ms, bad = read_table(lake, plan.rejected_table)
    bronze_ids = []
    for m in bronze_ms:
        for p in m.file_paths():
            bronze_ids += (
                pq.read_table(lake.local_path(p), columns=["_row_id"]).column("_row_id").to_pylist()
            )
    good_ids = good.column("_row_id").to_pylist() if good is not None else []
    bad_ids = bad.column("_row_id").to_pylist() if bad is not None else []
    assert sorted(good_ids + bad_ids) == sorted(bronze_ids)
    assert len(set(good_ids + bad_ids)) == len(bronze_ids)
    for m in silver_ms:
        rej = next(r for r in rejected_ms if r.batch_id == m.batch_id)
        assert m.rows + rej.rows == m.extra["bronze_rows"]
        assert sum(m.rejected.values()) == rej.rows
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
    good, bad = check_invariants(lake, plan)
    assert good.num_rows > 0.8 * len(texts)

    tok, info = open_tokenizer(tok_path)
    got = good.column("input_ids").to_pylist()
    want = [tok(t)["input_ids"] for t in good.column("text").to_pylist()]
    assert got == want  # every row, exactly
    assert good.column("num_tokens").to_pylist() == [len(x) for x in want]
    assert good.column("_row_id").to_pylist() == sorted(good.column("_row_id").to_pylist())
    assert good.schema.field("input_ids").type == pa.list_(pa.field("element", pa.int32()))
    manifest = committed_manifests(lake, plan.table)[0]
    assert manifest.extra["tokenizer_fingerprint"] == info.fingerprint
    assert manifest.extra["tokenizer_name"] == tok_path
    assert manifest.parents == [outcomes[0].bronze_batch_id]
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
    old_bytes = {
        p: lake.local_path(p).read_bytes()
        for m in committed_manifests(lake, plan.table)
        for p in m.file_paths()
    }
    plan2, second = run_silver(lake, tok, spark, tmp_path)
    assert [m.batch_id for m in plan2.pending] == [new_bronze.batch_id]  # only the new batch
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
    for p, data in old_bytes.items():  # committed silver is never rewritten
        assert lake.local_path(p).read_bytes() == data

    # Nothing new: nothing to do, nothing committed.
    before = sorted(p.name for p in (lake.local_path(plan.table)).iterdir())
    plan3, third = run_silver(lake, tok, spark, tmp_path)
    assert plan3.pending == [] and third == []
    assert sorted(p.name for p in (lake.local_path(plan.table)).iterdir()) == before

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
    assert {m.batch_id for m in committed_manifests(lake, plan.table)} == {
        o.batch_id for o in first + second + fourth
    }
    assert old_bronze.batch_id in committed_manifests(lake, plan.table)[0].parents


def _snapshot(lake, plan) -> dict[str, object]:
    out = {}
    for table in (plan.table, plan.rejected_table):
        for m in committed_manifests(lake, table):
            out[f"{table}/{m.batch_id}"] = (
                m.rows,
                m.rejected,
                m.parents,
                [(f.path, f.rows, f.sha256) for f in m.files],
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
    # The same bronze (ids, commit times) in a second lakehouse.
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
    assert len(committed_manifests(lake, partial.rejected_table)) == 2
    # A killed attempt may also leave stray files in an uncommitted batch folder.
    stray_dir = lake.local_path(partial.table)
    (stray_dir / "batch=leftover").mkdir()
    (stray_dir / "batch=leftover" / "part-00000.parquet").write_bytes(b"garbage")

    plan_after, outcomes = run_silver(lake, tok, spark, tmp_path / "crashed")
    assert len(outcomes) == 2
    assert _snapshot(lake, plan_after) == _snapshot(lakes["clean"], plan_clean)
    check_invariants(lake, plan_after)

    # Same again: nothing to do.
    assert run_silver(lake, tok, spark, tmp_path / "crashed")[1] == []


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
    ingest(lake, src)
    # An empty bronze batch (committed with no rows) must still be accounted for.
    empty = Manifest(
        batch_id="emptybatch0000000000",
        layer="bronze",
        dataset=DS,
        language=LANG,
        table=bronze_dir(DS, LANG),
        files=[],
        rows=0,
    )
    assert commit_batch(lake, empty)

    plan, outcomes = run_silver(lake, str(tiny_models["t5"]), spark, tmp_path)
    assert len(outcomes) == 2
    by_bronze = {o.bronze_batch_id: o for o in outcomes}
    assert by_bronze["emptybatch0000000000"].rows == 0
    assert by_bronze["emptybatch0000000000"].rejected == {}
    [mixed] = [o for o in outcomes if o.bronze_batch_id != "emptybatch0000000000"]
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
    long_row = bad.filter(pa.compute.equal(bad.column("reason"), "too_long")).to_pylist()[0]
    assert len(long_row["text"]) <= 1001 and "max_chars" in long_row["detail"]


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
    m = committed_manifests(lake, plan.table)[0]
    assert (m.extra["tokenizer_src_lang"], m.extra["tokenizer_tgt_lang"]) == ("en_XX", "fr_XX")


def test_missing_column_and_bad_tokenizer_are_clear_errors(tiny_models, tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"body": "some text here", "id": 1}) + "\n")
    ingest(lake, src, text="body")
    _, info = open_tokenizer(str(tiny_models["t5"]))
    plan = plan_silver(lake, DS, LANG, info)
    with pytest.raises(SilverError, match=r"no column 'text' \(source.text_column\).*'body'"):
        check_columns(lake, plan.pending, "text", None)
    with pytest.raises(SilverError, match="model.name_or_path"):
        open_tokenizer(str(tmp_path / "no-such-model"))
    # A bronze folder without a manifest is not pending (a crashed bronze attempt).
    stray = lake.local_path(batch_dir(bronze_dir(DS, LANG), "uncommitted"))
    stray.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x"]}), stray / "part-00000.parquet")
    assert [m.batch_id for m in plan_silver(lake, DS, LANG, info).pending] == [
        m.batch_id for m in plan.pending
    ]
