"""A bronze batch committed while silver runs: not half-read now, picked up by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.layout import rejected_dir, silver_dir
from tasks.lakehouse.storage import open_lakehouse
from tests.conftest import ROOT, last_json
from tests.integration.test_silver_cli import LANG, cli_args, sample, write_bronze

# Two silver runs (Spark) back to back: 1.5 minutes on 2 cores, in `make test`.
pytestmark = pytest.mark.reliability


def test_file_arriving_during_silver(tmp_path, tiny_models):
    root, src = tmp_path / "lake", tmp_path / "src"
    [first] = write_bronze(root, src, {"fr.jsonl": sample("fr")})
    args = cli_args(root, tiny_models["t5"])
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    planned, err_lines = threading.Event(), []

    def watch_stderr() -> None:
        for line in proc.stderr:
            err_lines.append(line)
            # build-silver has fixed its inputs (it plans again after the flow's plan).
            if "building silver from bronze" in line:
                planned.set()

    t = threading.Thread(target=watch_stderr, daemon=True)
    t.start()
    assert planned.wait(180), "".join(err_lines)[-3000:]
    # Silver has fixed its inputs and is working: a new bronze batch lands now.
    [late] = write_bronze(root, src, {"de.jsonl": sample("de")})
    still_running = proc.poll() is None
    out, _ = proc.communicate(timeout=300)
    t.join(10)
    assert proc.returncode == 0, "".join(err_lines)[-3000:]
    assert still_running, "silver ended before the new batch landed: the test proved nothing"
    first_run = last_json(out)
    assert first_run["parent_batch_ids"] == [first]
    tok = first_run["tokenizer"]
    lake = open_lakehouse(str(root))

    def rows_by_parent() -> dict[str, int]:
        """bronze batch id -> its silver + rejected rows."""
        out: dict[str, int] = {}
        for table in (silver_dir("json", LANG, tok), rejected_dir("json", LANG, tok)):
            for b in committed_batches(lake, table):
                [parent] = b.parents
                out[parent] = out.get(parent, 0) + b.rows
        return out

    assert [b.parents for b in committed_batches(lake, silver_dir("json", LANG, tok))] == [(first,)]
    assert rows_by_parent() == {first: len(sample("fr"))}
    assert first_run["rows"] + sum(first_run["rejected"].values()) == len(sample("fr"))

    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    second_run = last_json(second.stdout)
    assert second_run["parent_batch_ids"] == [late]
    silver = committed_batches(lake, silver_dir("json", LANG, tok))
    assert [p for s in silver for p in s.parents] == [first, late]  # commit order
    assert rows_by_parent() == {first: len(sample("fr")), late: len(sample("de"))}
    total = sum(rows_by_parent().values())
    assert total == len(sample("fr")) + len(sample("de"))
    print(
        f"reliability: fault=arrival_during_silver first_run_parents=1 second_run_parents=1 "
        f"bronze_rows={total} silver+rejected={total} rows_lost=0 "
        f"second_run_s={time.monotonic() - started:.1f}"
    )
