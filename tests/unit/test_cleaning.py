"""Cleaning rules (pure functions) and the Arrow tokenize step, without Spark."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.silver.cleaning import (
    REASONS,
    CleaningRules,
    check_target,
    check_text,
    dedupe_key,
    letter_ratio,
    normalize_text,
    repeated_line_ratio,
    truncate,
)

RULES = CleaningRules(min_chars=10, max_chars=200)
GOOD = "Le chat dort sur le canapé depuis ce matin."


def test_normalize_nfc_controls_and_whitespace():
    decomposed = "Cafe\u0301  au\tlait\x00\x07 \u200b\r\n\r\n\r\n\n  deux  "
    out = normalize_text(decomposed, RULES)
    assert out == "Café au lait\n\ndeux"
    assert normalize_text("a\u00a0b", RULES) == "a b"  # NBSP is whitespace too


def test_rules_can_be_switched_off():
    rules = CleaningRules(normalize="none", strip_control=False, collapse_whitespace=False)
    text = "Cafe\u0301  x\x07"
    assert normalize_text(text, rules) == text
    assert normalize_text("\ufb01", CleaningRules(normalize="NFKC")) == "fi"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "null_text"),
        ("  \n\t \x00 ", "empty"),
        ("short", "too_short"),
        ("x" * 201, "too_long"),
        ("1234 5678 9012 3456 !!!!", "low_letter_ratio"),
        ("abc \ufffd\ufffd\ufffd def ghi jkl", "bad_encoding"),
        ("same line here\n" * 5 + "another line", "repeated_lines"),
    ],
)
def test_each_reason(text, reason):
    cleaned, got, detail = check_text(text, RULES)
    assert (cleaned, got) == (None, reason)
    assert detail and reason in REASONS


def test_good_text_passes_and_bytes_are_decoded():
    assert check_text(GOOD, RULES) == (GOOD, None, "")
    cleaned, reason, _ = check_text(GOOD.encode("utf-8"), RULES)
    assert (cleaned, reason) == (GOOD, None)
    # One replacement character in a long text is under the 1% default: kept.
    long_text = GOOD * 3 + "\ufffd"
    assert check_text(long_text, CleaningRules(max_chars=1000))[1] is None


def test_thresholds_are_configurable():
    text = "1234 5678 abcd"
    assert check_text(text, CleaningRules(min_chars=1, min_letter_ratio=0.5))[1] == (
        "low_letter_ratio"
    )
    assert check_text(text, CleaningRules(min_chars=1, min_letter_ratio=0.3))[1] is None
    rep = "a line\na line\nother"
    assert check_text(rep, CleaningRules(min_chars=1, max_repeated_line_ratio=0.2))[1] == (
        "repeated_lines"
    )
    assert check_text(rep, CleaningRules(min_chars=1, max_repeated_line_ratio=0.5))[1] is None


def test_ratios():
    assert letter_ratio("ab 12") == 0.5
    assert letter_ratio("हिन्दी") == 1.0  # combining vowel signs count with their letters
    assert letter_ratio("   ") == 0.0
    assert repeated_line_ratio("a\nb\na\na") == 0.5
    assert repeated_line_ratio("one line") == 0.0


def test_targets():
    assert check_target(None, RULES)[1] == "null_target"
    assert check_target("  ", RULES)[1] == "null_target"
    assert check_target("Oui.", RULES) == ("Oui.", None, "")  # short targets are fine
    assert check_target("\ufffd" * 5, RULES)[1] == "bad_encoding"
    assert check_target("x" * 201, RULES)[1] == "too_long"


def test_dedupe_key_is_whitespace_insensitive_and_case_sensitive():
    assert dedupe_key("a  b\nc") == dedupe_key("a b c")
    assert dedupe_key("Abc") != dedupe_key("abc")
    assert dedupe_key("a", "b") != dedupe_key("a", "c")
    assert dedupe_key("a", "b") != dedupe_key("a")
    assert len(dedupe_key("x")) == 32


def test_truncate():
    assert truncate("abc", 5) == "abc"
    assert truncate("abcdef", 3) == "abc…"
    assert truncate(None) is None


def test_rules_from_dict_ignores_other_keys():
    rules = CleaningRules.from_dict({"min_chars": 3, "spark_master": "local[2]", "dedupe": 1})
    assert rules.min_chars == 3 and rules.max_chars == CleaningRules().max_chars


def test_tokenize_table_matches_the_tokenizer(tiny_models):
    from tasks.silver.tokenize import list_array, load_tokenizer, output_schema, tokenize_table

    tok = load_tokenizer(str(tiny_models["t5"]))
    texts = [
        GOOD,
        "tiny",
        None,
        "Das ist ein ganz normaler deutscher Satz, oder nicht?",
        GOOD + " " + GOOD,
    ]
    batch = pa.record_batch(
        {
            "_row_id": [f"r{i}" for i in range(len(texts))],
            "_bronze_batch_id": ["b1"] * len(texts),
            "text": pa.array(texts, pa.string()),
        }
    )
    limit = len(tok(GOOD)["input_ids"]) + 1
    out = tokenize_table(batch, tok, RULES, has_target=False, max_tokens=limit, ranks={"b1": 3})
    assert out.schema == output_schema(False)
    rows = out.to_pylist()
    assert [r["reason"] for r in rows] == [None, "too_short", "null_text", None, "too_many_tokens"]
    for r in rows:
        if r["reason"] is None:
            assert r["input_ids"] == tok(r["text"])["input_ids"]
            assert r["num_tokens"] == len(r["input_ids"]) and r["_text_hash"]
        else:
            assert r["input_ids"] is None and r["_text_hash"] is None and r["detail"]
    assert {r["_rank"] for r in rows} == {3}
    arr = list_array([[1, 2], None, []])
    assert arr.to_pylist() == [[1, 2], None, []]
