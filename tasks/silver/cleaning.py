"""Text cleaning rules for silver: pure functions, the same in the driver, executors and tests.

Each rule is configurable through `transform.*` (flows/params.py). A row either comes out
cleaned, or refused with a reason from `REASONS` and a short human-readable detail.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"

# Every reason a silver row can be refused with (the manifest counts rows by these).
REASONS = (
    "null_text",
    "empty",
    "bad_encoding",
    "too_short",
    "too_long",
    "low_letter_ratio",
    "repeated_lines",
    "null_target",
    "too_many_tokens",
    "duplicate",
)

# C0/C1 controls, minus tab and newline; also the Unicode line/paragraph separators and the
# zero-width/bidi formatting characters that break exact dedup without changing what a reader
# sees. Carriage returns are folded into newlines before this runs.
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]"
)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleaningRules:
    """The cleaning settings; mirrors `transform.*` of flows/params.py."""

    min_chars: int = 20
    max_chars: int = 100_000
    normalize: str = "NFC"
    strip_control: bool = True
    collapse_whitespace: bool = True
    max_replacement_ratio: float = 0.01
    min_letter_ratio: float = 0.5
    max_repeated_line_ratio: float = 0.5

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleaningRules:
        """Rules from a dict that may hold other keys too (e.g. all of `transform.*`)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_text(text: str, rules: CleaningRules) -> str:
    """Unicode normalisation, control characters and whitespace, as the rules say."""
    if rules.normalize != "none":
        text = unicodedata.normalize(rules.normalize, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if rules.strip_control:
        text = _CONTROL.sub("", text)
    if rules.collapse_whitespace:
        text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def replacement_ratio(text: str) -> float:
    """Share of U+FFFD (what bronze puts in place of bytes that were not UTF-8)."""
    return text.count(REPLACEMENT_CHAR) / len(text) if text else 0.0


def letter_ratio(text: str) -> float:
    """Share of letters (and combining marks, for Indic scripts) among non-space characters."""
    # Classify each distinct character once: a text has far fewer distinct characters than
    # characters, and Counter counts in C.
    visible = letters = 0
    for ch, n in Counter(text).items():
        if ch.isspace():
            continue
        visible += n
        if ch.isalpha() or unicodedata.category(ch)[0] == "M":
            letters += n
    return letters / visible if visible else 0.0


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (boilerplate, menus, spam)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def check_text(text: str | None, rules: CleaningRules) -> tuple[str | None, str | None, str]:
    """Clean one text and judge it: (cleaned, None, "") or (None, reason, detail)."""
    if text is None:
        return None, "null_text", "text is null"
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    ratio = replacement_ratio(text)
    if ratio > rules.max_replacement_ratio:
        return (
            None,
            "bad_encoding",
            (
                f"{ratio:.1%} U+FFFD (not UTF-8 in the source) > max_replacement_ratio "
                f"{rules.max_replacement_ratio:.1%}"
            ),
        )
    cleaned = normalize_text(text, rules)
    if not cleaned:
        return None, "empty", "no text left after cleaning"
    if len(cleaned) < rules.min_chars:
        return None, "too_short", f"{len(cleaned)} chars < min_chars {rules.min_chars}"
    if len(cleaned) > rules.max_chars:
        return None, "too_long", f"{len(cleaned)} chars > max_chars {rules.max_chars}"
    letters = letter_ratio(cleaned)
    if letters < rules.min_letter_ratio:
        return (
            None,
            "low_letter_ratio",
            (f"{letters:.0%} letters < min_letter_ratio {rules.min_letter_ratio:.0%}"),
        )
    repeated = repeated_line_ratio(cleaned)
    if repeated > rules.max_repeated_line_ratio:
        return (
            None,
            "repeated_lines",
            (
                f"{repeated:.0%} repeated lines > max_repeated_line_ratio "
                f"{rules.max_repeated_line_ratio:.0%}"
            ),
        )
    return cleaned, None, ""


def check_target(target: str | None, rules: CleaningRules) -> tuple[str | None, str | None, str]:
    """Clean a target text: only null/empty, encoding and length apply (targets can be short)."""
    if target is None:
        return None, "null_target", "target is null"
    if isinstance(target, bytes):
        target = target.decode("utf-8", errors="replace")
    ratio = replacement_ratio(target)
    if ratio > rules.max_replacement_ratio:
        return None, "bad_encoding", f"target: {ratio:.1%} U+FFFD (not UTF-8 in the source)"
    cleaned = normalize_text(target, rules)
    if not cleaned:
        return None, "null_target", "target is empty after cleaning"
    if len(cleaned) > rules.max_chars:
        return None, "too_long", f"target: {len(cleaned)} chars > max_chars {rules.max_chars}"
    return cleaned, None, ""


def dedupe_key(text: str, target: str | None = None) -> str:
    """Hash of the normalised text (and target): equal keys are exact duplicates.

    Whitespace differences do not make two texts different; case does. For pairs the key is
    the (text, target) pair, so one source with two different translations keeps both.
    """
    key = " ".join(text.split())
    if target is not None:
        key += "\x1f" + " ".join(target.split())
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


def truncate(text: str | None, limit: int = 1000) -> str | None:
    """The first `limit` characters (rejected rows keep a readable excerpt, not megabytes)."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "…"
