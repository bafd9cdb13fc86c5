"""Reaching the MLflow server: where it is, and retrying while it is unreachable.

Training must not be lost because MLflow was down when it ended: every tracking call goes
through `with_retries`, which keeps trying for a bounded time (MLflow's own HTTP retries are cut
short so this loop owns the waiting), then raises `TrackingError` saying where the trained model
is kept and that re-running the same command finishes the job. The token of a secured server is
passed in as a value (tasks.py reads it from its Prefect Secret block), never looked up here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tasks.errors import UserError
from tasks.secrets import refuse_secrets, remember_secret

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ENV = "LAKEHOUSE_TRACKING_RETRY_S"  # default total retry time while MLflow is down
DEFAULT_RETRY_S = 300.0
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"


class TrackingError(UserError, RuntimeError):
    """MLflow could not be reached or refused the request; the message says what to do."""


def configure_tracking(uri: str, token: str | None = None) -> str:
    """Point MLflow at `uri`; for an http(s) server, send `token` as its bearer token."""
    import mlflow

    uri = (uri or "").strip()
    if not uri:
        raise TrackingError("tracking.uri is empty: use sqlite:///mlflow.db or http://host:5000")
    refuse_secrets(uri, "tracking.uri")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        if token:
            # MLflow's REST client sends it as a bearer token; it is never logged.
            os.environ[TOKEN_ENV] = token
    elif uri.startswith("file:") or "://" not in uri:
        log.warning(
            "tracking.uri=%s is a file store: MLflow 3 deprecates it and its model registry "
            "needs a database; use sqlite:///mlflow.db (or an MLflow server) instead.",
            uri,
        )
    remember_secret(token)
    for name in (TOKEN_ENV, "MLFLOW_TRACKING_PASSWORD"):
        remember_secret(os.environ.get(name))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def mlflow_client(uri: str):
    """An MlflowClient on `uri` for tracking and registry alike."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_unreachable(exc: BaseException) -> bool:
    """True for faults that a later attempt may not have: connection, timeout, 5xx, DB locked."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | ConnectionError
        | TimeoutError,
    ):
        return True
    if isinstance(exc, MlflowException):
        # A server whose database is down answers TEMPORARILY_UNAVAILABLE; INTERNAL_ERROR is
        # usually a bug that waiting will not fix.
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        text = str(exc)
        return "API request to" in text and ("failed with" in text or "Max retries" in text)
    text = f"{type(exc).__name__}: {exc}"
    return "OperationalError" in text and ("locked" in text or "connect" in text.lower())


@contextlib.contextmanager
def fail_fast_http(timeout_s: int = 30) -> Iterator[None]:
    """Let our loop own the retries: MLflow's own default retries for ~4 minutes per request."""
    saved = {
        k: os.environ.get(k)
        for k in (
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "MLFLOW_HTTP_REQUEST_TIMEOUT",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        )
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _retry_budget(retry_for_s: float | None) -> float:
    if retry_for_s is not None:
        return max(0.0, retry_for_s)
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def with_retries(
    fn: Callable[[], T],
    what: str,
    uri: str,
    retry_for_s: float | None = None,
    model_dir: str | Path | None = None,
) -> T:
    """Call `fn` until it succeeds or the server stays unreachable for `retry_for_s` seconds."""
    budget = _retry_budget(retry_for_s)
    deadline = time.monotonic() + budget
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            with fail_fast_http():
                return fn()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                kept = (
                    f" Nothing is lost: the trained model is kept at {model_dir}."
                    if model_dir
                    else ""
                )
                raise TrackingError(
                    f"MLflow at {uri} was unreachable for {budget:.0f}s while {what} "
                    f"({attempt} attempts; last error: {short_error(exc)}).{kept} Start the "
                    f"MLflow server (or fix tracking.uri) and re-run the same command: the "
                    f"MLflow run is reopened and the model is registered once, never twice."
                ) from exc
            log.warning(
                "MLflow at %s unreachable while %s (attempt %d: %s); retrying in %.0fs",
                uri,
                what,
                attempt,
                short_error(exc),
                min(delay, left),
            )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 15.0)


def short_error(exc: BaseException) -> str:
    """`Type: first line` of an exception, cut to fit a log line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"
