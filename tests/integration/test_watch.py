"""watch: one lakehouse.landing.arrived event per new landing file, never twice (real Prefect)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from flows.params import load_params
from tasks.lakehouse.storage import open_lakehouse
from tasks.landing.zone import (
    ARRIVED_EVENT,
    LandingFile,
    claim,
    find_new_files,
    list_landing,
    normalize_uri,
)

ROWS = [{"text": f"Landing row number {i} with enough letters to pass cleaning."} for i in range(5)]


def write_landing(root: Path, name: str, rows=ROWS) -> Path:
    path = root / "landing" / "json" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arrived_events(root: Path, min_count: int, timeout: float = 120.0) -> list[dict]:
    """The lakehouse.landing.arrived events of files under `root` (this test's own: the server is
    shared) that the server stored, once there are `min_count` of them or `timeout` passed."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    EventsWorker.drain_all()  # everything this process emitted has been sent
    prefix = str(root.resolve())
    deadline = time.monotonic() + timeout
    while True:
        events: list[dict] = []
        page = httpx.post(
            f"{PREFECT_API_URL.value()}/events/filter",
            json={"filter": {"event": {"name": [ARRIVED_EVENT]}}, "limit": 50},
            timeout=10,
        )
        while page is not None:
            page.raise_for_status()
            body = page.json()
            events += [e for e in body["events"] if e["payload"]["uri"].startswith(prefix)]
            page = httpx.get(body["next_page"], timeout=10) if body.get("next_page") else None
        if len(events) >= min_count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_watch_announces_each_new_file_once(prefect_harness, tmp_path):
    from flows.bronze import bronze_flow
    from flows.watch import watch_flow

    root = tmp_path / "lake"
    a, b = write_landing(root, "a.jsonl"), write_landing(root, "sub/b.jsonl")
    write_landing(root, ".hidden.jsonl")
    params = load_params(overrides=[f"lakehouse.root={root}", "source.language=multi"])

    first = watch_flow(params=params)
    assert sorted(first.announced) == sorted([str(a.resolve()), str(b.resolve())])
    mine = arrived_events(root, 2)
    assert sorted(e["payload"]["uri"] for e in mine) == sorted(first.announced)
    for e in mine:
        assert e["payload"]["uris"] == [e["payload"]["uri"]]
        assert e["resource"]["prefect.resource.id"] == "lakehouse.landing.json"

    second = watch_flow(params=params)
    assert second.announced == []
    assert sorted(second.already_announced) == sorted(first.announced)

    # A file that bronze ingested before watch saw it is not announced at all.
    c = write_landing(root, "c.jsonl", [{"text": "Ingested before the watcher saw it, fine."}])
    bronze_flow(
        params=params.model_copy(
            update={"source": params.source.model_copy(update={"data_files": [str(c)]})}
        )
    )
    third = watch_flow(params=params)
    assert third.announced == [] and third.already_ingested == [str(c.resolve())]

    # A new version of an announced file (new mtime and size) is a new arrival.
    time.sleep(0.01)
    write_landing(root, "a.jsonl", ROWS * 2)
    assert watch_flow(params=params).announced == [str(a.resolve())]
    # One event per announcement, none for the runs that announced nothing.
    uris = sorted(e["payload"]["uri"] for e in arrived_events(root, 3))
    assert uris == sorted([str(a.resolve()), str(a.resolve()), str(b.resolve())])


def test_two_watchers_claim_a_file_once(tmp_path):
    lake = open_lakehouse(str(tmp_path / "lake"))
    write_landing(tmp_path / "lake", "x.jsonl")
    (f,) = list_landing(lake, "json")
    assert claim(lake, "json", f, "run-1") is True
    assert claim(lake, "json", f, "run-2") is False
    new, ingested, announced = find_new_files(lake, "json", "multi")
    assert (new, ingested, announced) == ([], [], [f.uri])
    # Uploads in progress are not data.
    write_landing(tmp_path / "lake", "y.jsonl.tmp")
    assert [x.rel for x in list_landing(lake, "json")] == [f.rel]


def test_watch_on_azure_landing(azure_lakehouse, tmp_path):
    from flows.watch import watch_flow

    lake = open_lakehouse(azure_lakehouse["root"], azure_lakehouse["block"])
    lake.write_bytes(
        "landing/json/day1/part.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    )
    params = load_params(
        overrides=[
            f"lakehouse.root={azure_lakehouse['root']}",
            f"lakehouse.block={azure_lakehouse['block']}",
        ]
    )
    first = watch_flow(params=params)
    expected = f"{azure_lakehouse['root']}/landing/json/day1/part.jsonl"
    assert first.announced == [expected]
    (f,) = list_landing(lake, "json")
    assert isinstance(f, LandingFile) and f.version  # the blob's etag
    assert watch_flow(params=params).announced == []


@pytest.mark.parametrize(
    "given,expected",
    [
        (
            "https://acct.blob.core.windows.net/lake/demo/landing/json/a%20b.jsonl",
            "az://lake/demo/landing/json/a b.jsonl",
        ),
        (
            "http://127.0.0.1:10000/devstoreaccount1/lake/landing/json/a.jsonl",
            "az://lake/landing/json/a.jsonl",
        ),
        ("abfss://lake@acct.dfs.core.windows.net/landing/x.jsonl", "az://lake/landing/x.jsonl"),
        ("/data/landing/json/a.jsonl", "/data/landing/json/a.jsonl"),
        ("az://lake/landing/json/a.jsonl", "az://lake/landing/json/a.jsonl"),
    ],
)
def test_normalize_uri(given, expected):
    assert normalize_uri(given) == expected
