"""Rebuild the shipped demo sample from gettext catalogs installed by Debian packages.

Run from the repository root: `python data/sample/build_sample.py [--locale-dir DIR] [--out DIR]`.
The output is deterministic for a given set of installed package versions (sorted inputs, one
seeded RNG); it prints the row counts and source package versions that README.md records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import struct
import subprocess
from pathlib import Path

SEED = 20240501
# CulturaX language code -> gettext locale folders, most specific first.
LANGUAGES = {
    "en": [],  # English text is the msgid side of the catalogs below.
    "fr": ["fr"],
    "de": ["de"],
    "es": ["es"],
    "it": ["it"],
    "pt": ["pt", "pt_BR"],
    "nl": ["nl"],
}
# Catalogs with long, human-written help texts; domain -> Debian package that ships it.
CATALOGS = {
    "coreutils": "coreutils",
    "tar": "tar",
    "grep": "grep",
    "sed": "sed",
    "findutils": "findutils",
    "diffutils": "diffutils",
    "gawk": "gawk",
    "bash": "bash",
    "make": "make",
    "wget": "wget",
    "dpkg": "dpkg",
    "apt": "apt",
    "man-db": "man-db",
    "gettext-tools": "gettext",
    "glib20": "libglib2.0-data",
    "libc": "libc-l10n",
}
DOCS_PER_LANGUAGE = 300
SHORT_DOCS = 12  # single short messages, so the cleaning step has something to reject
DUPLICATE_DOCS = 8  # exact copies of kept documents, so dedup has something to remove
MAX_DOC_CHARS = 3000  # a few long documents stay, for a max-length rule to find
PAIRS = {"fr": 1200, "de": 600}
WORD = re.compile(r"[^\W\d_]{3,}")


def read_mo(path: Path) -> list[tuple[str, str]]:
    """Parses a GNU .mo file into (msgid, msgstr) pairs in file order."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    _, count, ids_off, strs_off = struct.unpack(order + "4I", data[4:20])
    pairs = []
    for i in range(count):
        id_len, id_pos = struct.unpack(order + "2I", data[ids_off + 8 * i : ids_off + 8 * i + 8])
        st_len, st_pos = struct.unpack(order + "2I", data[strs_off + 8 * i : strs_off + 8 * i + 8])
        msgid = data[id_pos : id_pos + id_len].decode("utf-8", "replace")
        msgstr = data[st_pos : st_pos + st_len].decode("utf-8", "replace")
        # Context is "ctx\x04msgid"; plural forms are NUL-separated: keep the singular.
        msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]
        msgstr = msgstr.split("\x00", 1)[0]
        pairs.append((msgid, msgstr))
    return pairs


def is_prose(text: str) -> bool:
    """Tells whether a message reads as text rather than a bare format string or symbol."""
    return len(WORD.findall(text)) >= 2


def tidy(text: str) -> str:
    """Strips trailing blank lines that gettext keeps for terminal layout."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip()


def find_catalog(locale_dir: Path, folders: list[str], domain: str) -> Path | None:
    """Returns the first installed catalog for a domain among the locale folders."""
    for folder in folders:
        path = locale_dir / folder / "LC_MESSAGES" / f"{domain}.mo"
        if path.is_file():
            return path
    return None


def messages(locale_dir: Path, lang: str) -> list[tuple[str, int, str]]:
    """Lists (catalog path, index, text) for every usable message of one language."""
    out = []
    # English reads msgids from the French catalogs: same upstream strings, fr is complete.
    folders = LANGUAGES[lang] or ["fr"]
    for domain in sorted(CATALOGS):
        path = find_catalog(locale_dir, folders, domain)
        if path is None:
            continue
        for index, (msgid, msgstr) in enumerate(read_mo(path)):
            if not msgid or not msgstr or (lang != "en" and msgstr == msgid):
                continue
            text = tidy(msgid if lang == "en" else msgstr)
            if is_prose(text):
                out.append((str(path), index, text))
    return out


def documents(msgs: list[tuple[str, int, str]], rng: random.Random) -> list[dict]:
    """Groups neighbouring messages of one catalog into paragraph-size documents."""
    docs, buf = [], []
    target = 0

    def flush() -> None:
        if buf:
            path, index = buf[0][0], buf[0][1]
            docs.append({"text": "\n".join(t for _, _, t in buf), "path": path, "index": index})
            buf.clear()

    for item in msgs:
        if buf and item[0] != buf[0][0]:
            flush()
        if not buf:
            # Log-uniform lengths between 150 and 1500 chars, like short web pages.
            target = int(150 * 10 ** rng.random())
        buf.append(item)
        if sum(len(t) + 1 for _, _, t in buf) >= target:
            flush()
    flush()
    return docs


def timestamp(rng: random.Random) -> str:
    """Draws an ISO-8601 crawl time in the CulturaX crawl window."""
    start = dt.datetime(2019, 1, 1, tzinfo=dt.UTC)
    seconds = rng.randrange(int(4 * 365.25 * 86400))
    return (start + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def record(doc: dict, rng: random.Random) -> dict:
    """Shapes one document as a CulturaX row."""
    domain = Path(doc["path"]).stem
    return {
        "text": doc["text"],
        "timestamp": timestamp(rng),
        "url": f"file://{doc['path']}#{doc['index']}",
        "source": f"gettext-{domain}",
    }


def build_language(locale_dir: Path, lang: str, rng: random.Random) -> list[dict]:
    """Builds the shuffled CulturaX-shaped rows of one language."""
    msgs = messages(locale_dir, lang)
    docs = [d for d in documents(msgs, rng) if 120 <= len(d["text"]) <= MAX_DOC_CHARS]
    rng.shuffle(docs)
    kept = sorted(docs[:DOCS_PER_LANGUAGE], key=lambda d: (d["path"], d["index"]))
    rows = [record(d, rng) for d in kept]
    shorts = sorted((m for m in msgs if len(m[2]) < 25), key=lambda m: (m[0], m[1]))
    for path, index, text in rng.sample(shorts, min(SHORT_DOCS, len(shorts))):
        rows.append(record({"text": text, "path": path, "index": index}, rng))
    rows.extend(dict(row) for row in rng.sample(rows[: len(kept)], DUPLICATE_DOCS))
    rng.shuffle(rows)
    return rows


def build_pairs(locale_dir: Path, lang: str, n: int, rng: random.Random) -> list[dict]:
    """Builds English -> lang translation pairs from msgid/msgstr."""
    seen, pairs = set(), []
    for domain in sorted(CATALOGS):
        path = find_catalog(locale_dir, LANGUAGES[lang], domain)
        if path is None:
            continue
        for msgid, msgstr in read_mo(path):
            src, tgt = tidy(msgid), tidy(msgstr)
            if not src or not tgt or src == tgt or src in seen:
                continue
            if not (15 <= len(src) <= 300 and 10 <= len(tgt) <= 400 and is_prose(src)):
                continue
            seen.add(src)
            pairs.append({"source": src, "target": tgt})
    rng.shuffle(pairs)
    return pairs[:n]


def package_versions() -> dict[str, str]:
    """Reads the installed versions of the source packages, for provenance."""
    versions = {}
    for pkg in sorted(set(CATALOGS.values())):
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
        versions[pkg] = res.stdout.strip() or "unknown"
    return versions


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Writes rows as UTF-8 JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Rebuilds data/sample/culturax/ and data/sample/pairs/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locale-dir", type=Path, default=Path("/usr/share/locale"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    counts: dict[str, int] = {}
    for lang in LANGUAGES:
        # One RNG per output file so that changing one language leaves the others as they are.
        rows = build_language(args.locale_dir, lang, random.Random(f"{SEED}-{lang}"))
        write_jsonl(args.out / "culturax" / f"{lang}.jsonl", rows)
        counts[f"culturax/{lang}.jsonl"] = len(rows)
    for lang, n in PAIRS.items():
        rows = build_pairs(args.locale_dir, lang, n, random.Random(f"{SEED}-pairs-{lang}"))
        write_jsonl(args.out / "pairs" / f"en-{lang}.jsonl", rows)
        counts[f"pairs/en-{lang}.jsonl"] = len(rows)
    # Printed, not written, so the folders hold only data; README.md records this output.
    for name, n in counts.items():
        print(f"{name}: {n}")
    for pkg, version in package_versions().items():
        print(f"package {pkg}: {version}")


if __name__ == "__main__":
    main()
