"""What a person reads in a flow run's log: no Python bytecode disassembly.

datasets fingerprints a function given to `map`/`filter` by pickling it with dill, and dill finds
the globals of a closure by printing `dis.dis` into a swapped sys.stdout; Prefect's `log_prints`
replaces `print` itself, so inside our flows those lines went to the run's log (about 60 per
training run, from the eval split). The full path is checked by the e2e deployment test; this
one runs the eval split alone in a `log_prints` flow on the test server.
"""

from __future__ import annotations

import re

BYTECODE = re.compile(r"Disassembly of <code object|\b(LOAD_FAST|LOAD_GLOBAL|RETURN_VALUE)\b")


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)  # logs are sent in batches, in the background
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(log_filter, limit=200, offset=len(messages)):
            messages += [log.message for log in batch]
    return messages


def test_eval_split_prints_no_bytecode_into_the_run_log(prefect_harness, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prefect import flow

    from tasks.train.data import split_by_row_id

    # Silver as training reads it: parquet files through Dataset.from_parquet.
    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"_row_id": [f"b-{i}" for i in range(400)]}), part)

    @flow(name="eval-split-log-test", log_prints=True)
    def split() -> tuple[int, int]:
        ds = datasets.Dataset.from_parquet(str(part), cache_dir=str(tmp_path / "cache"))
        train, evals = split_by_row_id(ds, 0.1, max_eval_samples=20)
        print(f"split {len(train)} / {len(evals)}")
        return len(train), len(evals)

    state = split(return_state=True)
    n_train, n_eval = state.result()
    assert n_eval == 20 and n_train > 300
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any(m.startswith("split ") for m in logs), logs  # prints do reach the log
    noise = [m for m in logs if BYTECODE.search(m)]
    assert not noise, f"{len(noise)} disassembly lines in the run log, e.g. {noise[:3]}"
