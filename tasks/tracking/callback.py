"""Training metrics to MLflow by step, from inside the Trainer; never stops training.

The callback runs in the training process (rank 0 of a data-parallel run), which has no Prefect
and must not wait for MLflow: points are sent with `log_batch` as the Trainer logs them, kept in
memory (bounded) while the server is unreachable, and sent with a later flush.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

from tasks.tracking.scrub import MAX_METRICS_PER_BATCH, valid_key
from tasks.tracking.server import fail_fast_http, mlflow_client, short_error

log = logging.getLogger(__name__)


class MlflowMetricsCallback(TrainerCallback):
    """Logs the Trainer's numeric logs by step with `log_batch`; never stops training.

    While MLflow is unreachable the points stay in memory (bounded) and go with the next
    successful flush: the next `on_log`, `on_train_end` (which retries for `final_retry_s`), or
    an explicit `flush()` (finish_run calls it).
    """

    def __init__(
        self, run_id: str, uri: str, *, final_retry_s: float = 30.0, max_pending: int = 200_000
    ):
        self.run_id, self.uri = run_id, uri
        self.final_retry_s, self.max_pending = final_retry_s, max_pending
        self.pending: list = []
        self.dropped = 0
        self._failing = False
        self._next_try, self._pause = 0.0, 5.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Queue the numeric values of `logs` at the current global step and send them."""
        if not state.is_world_process_zero or not logs:
            return
        self.add(logs, state.global_step)
        # During an outage, try again only now and then: a hung server must not slow training.
        if time.monotonic() >= self._next_try:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        """Send what is left, retrying for a while."""
        if state.is_world_process_zero:
            self.flush(retry_for_s=self.final_retry_s)

    def add(self, values: dict[str, Any], step: int) -> None:
        """Queue numeric values (bools and text are skipped) as metrics at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.pending.append(Metric(valid_key(str(key)), float(value), now, int(step)))
        if len(self.pending) > self.max_pending:
            # Keep the newest points: memory stays bounded during a long outage.
            extra = len(self.pending) - self.max_pending
            self.dropped += extra
            del self.pending[:extra]

    def flush(self, retry_for_s: float = 0.0) -> bool:
        """Send queued points; True when nothing is left. Never raises."""
        deadline = time.monotonic() + retry_for_s
        delay = 1.0
        while self.pending:
            try:
                with fail_fast_http(timeout_s=10):
                    client = mlflow_client(self.uri)
                    while self.pending:
                        chunk = self.pending[:MAX_METRICS_PER_BATCH]
                        client.log_batch(self.run_id, metrics=chunk)
                        del self.pending[: len(chunk)]
                if self._failing:
                    log.info("MLflow reachable again: buffered metrics sent")
                self._failing, self._next_try, self._pause = False, 0.0, 5.0
            except Exception as exc:  # noqa: BLE001 - metrics must never stop training
                if not self._failing:
                    log.warning(
                        "MLflow unreachable (%s): %d metric points kept for later",
                        short_error(exc),
                        len(self.pending),
                    )
                self._failing = True
                self._next_try = time.monotonic() + self._pause
                self._pause = min(self._pause * 2, 300.0)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(delay, left))
                delay = min(delay * 2, 10.0)
        return True
