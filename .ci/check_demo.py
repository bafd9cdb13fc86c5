"""CI check of two `make demo` outputs in a row (`make ci-extra`): check_demo.py FIRST SECOND

- the first run registered a model version when it trained (in a fresh checkout it trains;
  where a demo ran before, it may find nothing new);
- the re-run has nothing new: every layer of its result is null and flows.where says so;
- neither output holds Python bytecode disassembly, nor an unrounded number in what flows.where
  prints for people.
Exit 1 with the reasons when a check fails.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LAYERS = ("bronze", "silver", "train")
BYTECODE = re.compile(r"Disassembly of <code object|\b(LOAD_FAST|LOAD_GLOBAL|RETURN_VALUE)\b")
# Six or more decimals: a float printed as Python's repr (18881.53157125749).
UNROUNDED = re.compile(r"\d\.\d{6,}")


def pipeline_result(text: str) -> dict | None:
    """The pipeline's --json line: the last stdout line that is a JSON object with the layers."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and set(LAYERS) <= set(value):
                return value
    return None


def where_summary(text: str) -> str:
    """What flows.where printed (from its "Where to look:" line on)."""
    start = text.rfind("Where to look:")
    return text[start:] if start >= 0 else ""


def check(name: str, text: str, rerun: bool) -> list[str]:
    problems = []
    result = pipeline_result(text)
    summary = where_summary(text)
    if result is None:
        return [f"{name}: no pipeline result (--json line) in the output"]
    if not summary:
        problems.append(f"{name}: flows.where printed nothing")
    idle = not any(result.get(layer) for layer in LAYERS)
    if rerun and not idle:
        new = [layer for layer in LAYERS if result.get(layer)]
        problems.append(f"{name}: the re-run found something new in {new}")
    if result.get("train") and not result["train"].get("model_version"):
        problems.append(f"{name}: trained but registered no model version")
    if idle and "nothing new" not in summary:
        problems.append(f"{name}: nothing new, but flows.where does not say so")
    noise = [ln for ln in text.splitlines() if BYTECODE.search(ln)]
    if noise:
        problems.append(f"{name}: {len(noise)} lines of bytecode disassembly, e.g. {noise[0]!r}")
    unrounded = UNROUNDED.findall(summary)
    if unrounded:
        problems.append(f"{name}: unrounded numbers in the summary: {unrounded}")
    ran = [layer for layer in LAYERS if result.get(layer)] or ["nothing new"]
    print(f"{name}: {', '.join(ran)}; {len(text.splitlines())} lines of output")
    return problems


def main(first: str, second: str) -> int:
    problems = check("first demo", Path(first).read_text(errors="replace"), rerun=False)
    problems += check("demo re-run", Path(second).read_text(errors="replace"), rerun=True)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
