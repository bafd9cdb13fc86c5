"""MLflow tracking and registry: one run per training run, the model as a pyfunc, the registry.

Plain functions (no Prefect task wrappers here) that take a tracking URI and ids:

- `start_run` creates the run for a training run, or reopens the one tagged with its `run_key`
  (a resumed training continues the same MLflow run).
- `MlflowMetricsCallback` logs the Trainer's metrics by step; an unreachable server never stops
  training (points are buffered and sent later).
- `finish_run` logs final metrics, lineage, the silver dataset input, artifacts and the model
  as an `mlflow.pyfunc` model (tasks/tracking/pyfunc_model.py).
- `register_model` registers that model once per run (idempotent), sets alias `candidate`, and
  moves `champion` when the metric beats the current champion.

Every call retries while the server is unreachable, for a bounded time, then raises
`TrackingError` saying where the model is kept. Nothing secret is logged: secret-named keys are
dropped, and values that look like credentials (or equal a loaded secret) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from transformers import TrainerCallback

from tasks import REPO_ROOT
from tasks.errors import UserError
from tasks.secrets import SecretInParameterError, refuse_secrets

log = logging.getLogger(__name__)

T = TypeVar("T")

PYFUNC_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
MODEL_NAME = "model"  # the logged model's name inside the run
RUN_KEY_TAG = "lakehouse.run_key"
MODEL_ID_TAG = "lakehouse.model_id"
MODEL_DIR_TAG = "lakehouse.model_dir"
CANDIDATE, CHAMPION = "candidate", "champion"
RETRY_ENV = "LAKEHOUSE_TRACKING_RETRY_S"  # default total retry time while MLflow is down
DEFAULT_RETRY_S = 300.0
# Packages the pyfunc model needs at load time; versions come from pyproject.toml.
MODEL_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "pandas",
    "numpy",
)
DEFAULT_EXAMPLES = [
    "The weather in Paris is <extra_id_0> today.",
    "Le chat dort <extra_id_0> le canapé.",
]
# MLflow limits (mlflow.utils.validation).
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 6000, 8000, 100, 1000
# Keys whose value is a credential by name. `*_secret` and `block` fields hold the NAME of a
# Prefect block (never the secret), so they are kept when the value looks like a block name.
_SECRET_KEY = re.compile(
    r"(^|[._-])(token|hub_token|secret|password|passwd|pwd|api_?key|access_?key|account_?key|"
    r"key|credentials?|connection_?string|conn_?str|sas|sas_?token|auth)([._-]|$)",
    re.I,
)
_BLOCK_NAME_KEY = re.compile(r"(^|\.)(\w*_secret|block)$")
_BLOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_TEXT_SUFFIXES = {
    ".yaml",
    ".yml",
    ".json",
    ".txt",
    ".md",
    ".cfg",
    ".ini",
    ".toml",
    ".csv",
    ".env",
    ".log",
    "",
}
# Files of a Trainer output folder that are not part of the model (and may hold secrets:
# training_args.bin pickles TrainingArguments, hub_token included).
_NOT_MODEL_FILES = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|training_args\.bin|trainer_state\.json|"
    r"scaler\.pt|checkpoint-\d+|runs)$"
)
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*\.json|special_tokens_map\.json|added_tokens\.json|spiece\.model|"
    r"sentencepiece\.bpe\.model|vocab.*|merges\.txt|chat_template.*)$"
)
_KNOWN_SECRETS: set[str] = set()  # values loaded from secret blocks in this process


class TrackingError(UserError, RuntimeError):
    """MLflow could not be reached or refused the request; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Configuration and secrets


def configure_tracking(uri: str, token_secret: str | None = None) -> str:
    """Point MLflow at `uri`; load the server token from a Prefect Secret block for http(s)."""
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
        token = _load_token(token_secret)
        if token:
            # MLflow's REST client sends it as a bearer token; it is never logged.
            os.environ["MLFLOW_TRACKING_TOKEN"] = token
    elif uri.startswith("file:") or "://" not in uri:
        log.warning(
            "tracking.uri=%s is a file store: MLflow 3 deprecates it and its model registry "
            "needs a database; use sqlite:///mlflow.db (or an MLflow server) instead.",
            uri,
        )
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        if os.environ.get(name):
            _KNOWN_SECRETS.add(os.environ[name])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _load_token(token_secret: str | None) -> str | None:
    """The value of the Prefect Secret block `token_secret`, or None when it does not exist."""
    if not token_secret:
        return None
    from blocks.secret import load_secret

    try:
        token = load_secret(token_secret)
    except Exception as exc:  # noqa: BLE001 - no Prefect API: anonymous, like a missing block
        log.warning(
            "could not read the Prefect Secret block %r (%s): no MLflow token sent",
            token_secret,
            type(exc).__name__,
        )
        return None
    if token:
        _KNOWN_SECRETS.add(token)
    return token or None


def _looks_secret(value: Any, field: str) -> str | None:
    """The reason `value` must not be logged, or None."""
    try:
        refuse_secrets(value, field)
    except SecretInParameterError as exc:
        return str(exc)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if any(s and s in text for s in _KNOWN_SECRETS):
        return f"{field} contains the value of a secret block; pass the block's name instead."
    return None


def scrub(
    values: dict[str, Any], kind: str = "param", on_secret: Literal["raise", "drop"] = "raise"
) -> dict[str, str]:
    """Values safe to log as MLflow params or tags: secret-named keys dropped, secrets refused."""
    limit = MAX_PARAM_VALUE if kind == "param" else MAX_TAG_VALUE
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in values.items():
        key = _valid_key(str(key))
        name_says_secret = bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))
        if name_says_secret and not (
            _BLOCK_NAME_KEY.search(key)
            and (value is None or (isinstance(value, str) and _BLOCK_NAME.fullmatch(value)))
        ):
            dropped.append(key)
            continue
        reason = _looks_secret(value, key)
        if reason:
            if on_secret == "raise":
                raise SecretInParameterError(reason)
            log.warning("%s %s not logged to MLflow: it looks like a credential", kind, key)
            continue
        out[key] = _truncate(_as_text(value), limit)
    if dropped:
        log.info("%ss not logged to MLflow (secret by name): %s", kind, ", ".join(dropped))
    return out


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _truncate(text: str, limit: int) -> str:
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def _valid_key(key: str) -> str:
    """MLflow accepts letters, digits, `_ - . / :` and spaces in names (max 250 chars)."""
    return re.sub(r"[^\w./: -]", "_", key)[:250]


# ---------------------------------------------------------------------------------------------
# Retries while the server is unreachable


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
def _fail_fast_http(timeout_s: int = 30) -> Iterator[None]:
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
            with _fail_fast_http():
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
                    f"({attempt} attempts; last error: {_short(exc)}).{kept} Start the MLflow "
                    f"server (or fix tracking.uri) and re-run the same command: the MLflow run "
                    f"is reopened and the model is registered once, never twice."
                ) from exc
            log.warning(
                "MLflow at %s unreachable while %s (attempt %d: %s); retrying in %.0fs",
                uri,
                what,
                attempt,
                _short(exc),
                min(delay, left),
            )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 15.0)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------------
# Runs


def prefect_tags() -> dict[str, str]:
    """Tags linking the MLflow run to the Prefect flow run and deployment (when there is one)."""
    from tasks.code_version import code_version

    sha = code_version()
    tags = {"git_sha": sha, "mlflow.source.git.commit": sha}
    try:
        from prefect.runtime import deployment, flow_run

        if flow_run.id:
            tags.update(
                {
                    "prefect.flow_run_id": str(flow_run.id),
                    "prefect.flow_run_name": str(flow_run.name or ""),
                    "prefect.flow_name": str(flow_run.flow_name or ""),
                }
            )
            url = flow_run.ui_url
            if url and str(url).startswith(("http://", "https://")):
                tags["prefect.flow_run_url"] = str(url)
            if flow_run.parent_flow_run_id:
                tags["prefect.parent_flow_run_id"] = str(flow_run.parent_flow_run_id)
        if deployment.id:
            tags["prefect.deployment_id"] = str(deployment.id)
            tags["prefect.deployment"] = str(deployment.name or "")
    except Exception as exc:  # noqa: BLE001 - tags are informative; never fail a run on them
        log.debug("no Prefect runtime tags: %s", exc)
    return {k: v for k, v in tags.items() if v}


def start_run(
    uri: str,
    experiment: str,
    run_key: str,
    params: dict,
    tags: dict,
    token_secret: str | None = None,
    *,
    run_name: str | None = None,
    retry_for_s: float | None = None,
) -> str:
    """Create the MLflow run for `run_key`, or reopen the existing one; returns its run id."""
    from mlflow.entities import Param, RunTag

    uri = configure_tracking(uri, token_secret)
    clean_params = scrub(params, "param", on_secret="raise")
    clean_tags = {**prefect_tags(), **scrub(tags, "tag", on_secret="raise"), RUN_KEY_TAG: run_key}

    def attempt() -> str:
        client = _client(uri)
        exp_id = _experiment_id(client, uri, experiment)
        run = _find_run(client, exp_id, run_key)
        if run is None:
            name = run_name or clean_tags.get("prefect.flow_run_name") or run_key
            run = client.create_run(exp_id, run_name=_truncate(name, 250), tags=clean_tags)
            run = _one_run_per_key(client, exp_id, run_key, run)
            log.info("MLflow run %s created in experiment %r", run.info.run_id, experiment)
        elif run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
            log.info(
                "MLflow run %s (%s) reopened for %s", run.info.run_id, run.info.status, run_key
            )
        run_id = run.info.run_id
        old = run.data.params
        changed = sorted(k for k, v in clean_params.items() if k in old and old[k] != v)
        if changed:
            # MLflow params are immutable: the first values stay, the change is recorded.
            log.warning(
                "params changed since MLflow run %s began (kept the first values): %s",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in clean_params.items() if k not in old]
        history = run.data.tags.get("prefect.flow_run_ids", "")
        fr = clean_tags.get("prefect.flow_run_id")
        if fr and fr not in history.split(","):
            history = ",".join(x for x in (history, fr) if x)
        run_tags = {
            **clean_tags,
            **({"prefect.flow_run_ids": history} if history else {}),
            **({"lakehouse.params_changed": ",".join(changed)} if changed else {}),
        }
        tag_list = [RunTag(k, _truncate(v, MAX_TAG_VALUE)) for k, v in run_tags.items()]
        for i in range(0, max(len(new), len(tag_list)), MAX_PARAMS_PER_BATCH):
            client.log_batch(
                run_id,
                params=new[i : i + MAX_PARAMS_PER_BATCH],
                tags=tag_list[i : i + MAX_PARAMS_PER_BATCH],
            )
        return run_id

    return with_retries(attempt, f"starting the MLflow run for {run_key}", uri, retry_for_s)


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment `name`, created (or restored) when needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # created concurrently


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store sit next to the database file; servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment).strip("-") or "experiment"
    return (db.parent / "mlartifacts" / slug).as_uri()


def _run_filter(run_key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{run_key.replace(chr(39), chr(39) * 2)}'"


def _find_run(client, exp_id: str, run_key: str):
    """The oldest active run tagged with `run_key`, or None."""
    runs = client.search_runs(
        [exp_id], _run_filter(run_key), max_results=10, order_by=["attributes.start_time ASC"]
    )
    return runs[0] if runs else None


def _one_run_per_key(client, exp_id: str, run_key: str, created):
    """Two starts racing on one key: the oldest run wins and ours is deleted."""
    first = _find_run(client, exp_id, run_key)
    if first is not None and first.info.run_id != created.info.run_id:
        client.delete_run(created.info.run_id)
        return first
    return created


# ---------------------------------------------------------------------------------------------
# Metrics during training


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
            self.pending.append(Metric(_valid_key(str(key)), float(value), now, int(step)))
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
                with _fail_fast_http(timeout_s=10):
                    client = _client(self.uri)
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
                        _short(exc),
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


# ---------------------------------------------------------------------------------------------
# End of training: metrics, lineage, dataset, artifacts, model


def finish_run(
    run_id: str,
    uri: str,
    model_dir: str | Path,
    metrics: dict,
    artifacts: dict[str, str | Path],
    silver_manifests: list[dict],
    params: dict | None = None,
    lineage_tags: dict | None = None,
    *,
    token_secret: str | None = None,
    step: int | None = None,
    lakehouse_root: str | None = None,
    input_examples: list[str] | None = None,
    model_config: dict | None = None,
    metrics_callback: MlflowMetricsCallback | None = None,
    retry_for_s: float | None = None,
    status: str = "FINISHED",
) -> None:
    """Log final metrics, lineage, the silver dataset, artifacts and the pyfunc model; end the run.

    `artifacts` maps a destination folder in the run (config, tokenizer, plots, manifests) to a
    local file or folder. A loss-curve image is drawn from the run's metrics unless given as
    `loss_curve`. Idempotent: a re-run after a failure logs what is missing and reuses a model
    already logged for this run.
    """
    from mlflow.entities import Metric, Param, RunTag

    uri = configure_tracking(uri, token_secret)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise TrackingError(
            f"{model_dir}: not a saved Hugging Face model folder (no config.json); pass the "
            "folder written by trainer.save_model()/save_pretrained()"
        )
    clean_params = scrub(params or {}, "param", on_secret="drop")
    tags = {
        **lineage_from_manifests(silver_manifests, lakehouse_root),
        **scrub(lineage_tags or {}, "tag", on_secret="drop"),
        MODEL_DIR_TAG: str(model_dir),
    }
    tags = scrub(tags, "tag", on_secret="drop")
    if step is None:
        step = int(metrics.get("global_step") or 0)
    now = int(time.time() * 1000)
    metric_list = [
        Metric(_valid_key(k), float(v), now, step)
        for k, v in metrics.items()
        if not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(float(v))
    ]
    work = Path(tempfile.mkdtemp(prefix="mlflow-finish-"))
    try:
        lineage_file = work / "lineage" / "silver_manifests.json"
        lineage_file.parent.mkdir(parents=True)
        lineage_file.write_text(json.dumps(_redact(silver_manifests), indent=2, default=str))
        to_log = {"lineage": lineage_file, **_safe_artifacts(artifacts)}
        staged = _stage_model(model_dir, work / "hf-model")
        if "tokenizer" not in to_log:
            to_log.update(
                _safe_artifacts({"tokenizer": _tokenizer_files(staged, work / "tokenizer")})
            )

        def attempt() -> None:
            client = _client(uri)
            if metrics_callback is not None and not metrics_callback.flush():
                raise ConnectionError("buffered training metrics could not be sent")
            run = client.get_run(run_id)
            new = [Param(k, v) for k, v in clean_params.items() if k not in run.data.params]
            tag_list = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, max(len(new), len(tag_list)), MAX_PARAMS_PER_BATCH):
                client.log_batch(
                    run_id,
                    params=new[i : i + MAX_PARAMS_PER_BATCH],
                    tags=tag_list[i : i + MAX_PARAMS_PER_BATCH],
                )
            # A re-run after a failure does not log the same final values twice.
            fresh = [m for m in metric_list if run.data.metrics.get(m.key) != m.value]
            for i in range(0, len(fresh), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=fresh[i : i + MAX_METRICS_PER_BATCH])
            if silver_manifests:
                _log_silver_input(client, run_id, silver_manifests, lakehouse_root)
            if "config" not in to_log:
                config = write_resolved_config(
                    clean_params or run.data.params, work / "config" / "resolved_config.yaml"
                )
                to_log["config"] = config
            for dest, path in to_log.items():
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=dest)
                else:
                    client.log_artifact(run_id, str(path), artifact_path=dest)
            if "loss_curve" not in artifacts:
                image = plot_loss_curve(client, run_id, work / "plots" / "loss_curve.png")
                if image is not None:
                    client.log_artifact(run_id, str(image), artifact_path="plots")
            model_id = logged_model_id(client, run_id)
            if model_id is None:
                model_id = _log_pyfunc(uri, run_id, staged, input_examples, model_config)
            client.set_tag(run_id, MODEL_ID_TAG, model_id)
            client.set_terminated(run_id, status)

        with_retries(attempt, f"finishing MLflow run {run_id}", uri, retry_for_s, model_dir)
        log.info("MLflow run %s finished: model, metrics, lineage and artifacts logged", run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_resolved_config(flat: dict[str, str], out: Path) -> Path:
    """The (secret-free) flattened parameters as a nested YAML file."""
    import yaml

    tree: dict[str, Any] = {}
    for key, text in sorted(flat.items()):
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            value = text
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else node
        node[parts[-1]] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return out


def _tokenizer_files(model_dir: Path, out: Path) -> Path:
    """The tokenizer files of a saved model folder, copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and _TOKENIZER_FILE.match(item.name):
            shutil.copy2(item, out / item.name)
    return out


def lineage_from_manifests(
    silver_manifests: list[dict], lakehouse_root: str | None = None
) -> dict[str, str]:
    """Lineage tags: silver and bronze (parent) batch ids and URIs."""
    if not silver_manifests:
        return {}
    ids = [str(m.get("batch_id")) for m in silver_manifests]
    uris = [_batch_uri(m, lakehouse_root) for m in silver_manifests]
    tables = sorted({u.rsplit("/batch=", 1)[0] for u in uris})
    parents = sorted({str(p) for m in silver_manifests for p in m.get("parents") or []})
    tags = {
        "lineage.silver.batch_ids": ",".join(ids),
        "lineage.silver.uris": ",".join(uris),
        "lineage.silver.tables": ",".join(tables),
        "lineage.silver.rows": str(sum(int(m.get("rows") or 0) for m in silver_manifests)),
        "lineage.silver.digest": silver_digest(silver_manifests),
        "lineage.bronze.batch_ids": ",".join(parents),
    }
    bronze_tables = sorted(
        {
            str(m["extra"]["bronze_table"])
            for m in silver_manifests
            if isinstance(m.get("extra"), dict) and m["extra"].get("bronze_table")
        }
    )
    if bronze_tables:
        tags["lineage.bronze.tables"] = ",".join(_join(lakehouse_root, t) for t in bronze_tables)
    too_long = [k for k, v in tags.items() if len(v) > MAX_TAG_VALUE]
    for k in too_long:
        tags[k] = tags[k][: MAX_TAG_VALUE - 60] + ",...(see artifact lineage/silver_manifests.json)"
    return tags


def silver_digest(silver_manifests: list[dict]) -> str:
    """A short digest of the silver batch ids (MLflow allows 36 characters)."""
    ids = "\n".join(sorted(str(m.get("batch_id")) for m in silver_manifests))
    return hashlib.sha256(ids.encode()).hexdigest()[:32]


def _join(root: str | None, rel: str) -> str:
    if not root or "://" in rel or rel.startswith("/"):
        return rel
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def _batch_uri(m: dict, root: str | None) -> str:
    if m.get("uri"):
        return str(m["uri"])
    return _join(root, f"{m.get('table', '')}/batch={m.get('batch_id')}")


def _log_silver_input(client, run_id: str, silver_manifests: list[dict], root: str | None) -> None:
    """Log the silver batches as one MLflow dataset input (a reference, not a copy)."""
    from mlflow.entities import DatasetInput, InputTag

    run = client.get_run(run_id)
    digest = silver_digest(silver_manifests)
    inputs = run.inputs.dataset_inputs if run.inputs else []
    if any(d.dataset.digest == digest for d in inputs or []):
        return  # already logged by an earlier attempt
    dataset = _silver_dataset(silver_manifests, root, digest)
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")]
            )
        ],
    )


def _silver_dataset(silver_manifests: list[dict], root: str | None, digest: str):
    from mlflow.data.meta_dataset import MetaDataset

    first = silver_manifests[0]
    table = _batch_uri(first, root).rsplit("/batch=", 1)[0]
    name = (
        "silver/" + "/".join(str(first.get(k)) for k in ("dataset", "language") if first.get(k))
        or "silver"
    )
    return MetaDataset(
        _dataset_source(table),
        name=name[:500],
        digest=digest,
        schema=_mlflow_schema(first.get("schema") or first.get("schema_") or {}),
    )


def _dataset_source(table_uri: str):
    """A local folder resolves to MLflow's own source type; az:// gets a small generic one."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with contextlib.suppress(Exception), warnings.catch_warnings():
        # MLflow warns that a local path matches its local source type twice; harmless.
        warnings.simplefilter("ignore", UserWarning)
        if "://" not in table_uri or table_uri.startswith(("file://", "abfss://", "wasbs://")):
            return resolve_dataset_source(table_uri)

    class LakehouseDatasetSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "lakehouse"

        def load(self, **kwargs):
            return self.uri

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any):
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]):
            return cls(source_dict["uri"])

    return LakehouseDatasetSource(table_uri)


def _mlflow_schema(schema: dict[str, str]):
    """Manifest column types (pyarrow names) as an MLflow schema; unknown types are left out."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    scalar = {
        "string": DataType.string,
        "large_string": DataType.string,
        "int64": DataType.long,
        "int32": DataType.integer,
        "int16": DataType.integer,
        "double": DataType.double,
        "float": DataType.float,
        "bool": DataType.boolean,
        "timestamp[us, tz=UTC]": DataType.datetime,
        "binary": DataType.binary,
    }
    cols = []
    for name, typ in schema.items():
        typ = str(typ)
        m = re.fullmatch(r"(?:large_)?list<(?:item|element): (\w+)>", typ)
        if typ in scalar:
            cols.append(ColSpec(scalar[typ], name))
        elif m and m.group(1) in scalar:
            cols.append(ColSpec(Array(scalar[m.group(1)]), name))
    return Schema(cols) if cols else None


def _safe_artifacts(artifacts: dict[str, str | Path]) -> dict[str, Path]:
    """The artifacts that exist and hold no secret (others are skipped with a warning)."""
    out: dict[str, Path] = {}
    for dest, src in artifacts.items():
        path = Path(src)
        if not path.exists():
            log.warning("artifact %s: %s does not exist; not logged", dest, path)
            continue
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        bad = next((p for p in files if _file_has_secret(p)), None)
        if bad is not None:
            log.warning("artifact %s not logged: %s looks like it holds a credential", dest, bad)
            continue
        # The loss curve goes where finish_run would draw it.
        folder = "plots" if dest == "loss_curve" else _valid_key(dest).strip("/")
        out[folder or "artifacts"] = path
    return out


def _file_has_secret(path: Path) -> bool:
    size = path.stat().st_size
    if size > 64 * 2**20:
        return False
    data = path.read_bytes()
    if any(s.encode() in data for s in _KNOWN_SECRETS if s):
        return True
    if path.suffix.lower() in _TEXT_SUFFIXES and size < 4 * 2**20:
        return _looks_secret(data.decode("utf-8", errors="replace"), str(path)) is not None
    return False


def _redact(value: Any) -> Any:
    """A copy of `value` with credential-looking strings replaced (for files we write)."""
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, str) and _looks_secret(value, "value"):
        return "***redacted***"
    return value


def plot_loss_curve(client, run_id: str, out: Path) -> Path | None:
    """Draw train and eval loss by step from the run's metric history; None when there is none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {}
    for key in ("loss", "eval_loss"):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if points:
            series[key] = points
    if not series:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in series.items():
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o" if len(points) < 30 else None,
            label=key,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _stage_model(model_dir: Path, dst: Path) -> Path:
    """The model folder without checkpoints or training state (links, no copies)."""
    dst.mkdir(parents=True)
    for item in model_dir.iterdir():
        if _NOT_MODEL_FILES.match(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)
    return dst


def logged_model_id(client, run_id: str) -> str | None:
    """The id of the READY pyfunc model logged by this run (latest), or None."""
    run = client.get_run(run_id)
    ids = []
    tagged = run.data.tags.get(MODEL_ID_TAG)
    if tagged:
        ids.append(tagged)
    outputs = run.outputs.model_outputs if run.outputs else []
    ids += [o.model_id for o in sorted(outputs, key=lambda o: o.step, reverse=True)]
    for model_id in dict.fromkeys(ids):
        try:
            model = client.get_logged_model(model_id)
        except Exception as exc:  # noqa: BLE001 - a deleted model is just not reusable
            if is_unreachable(exc):
                raise
            continue
        if model.name == MODEL_NAME and str(model.status) == "READY":
            return model_id
    return None


def pip_requirements() -> list[str]:
    """The model's pip requirements, pinned as in pyproject.toml (installed versions otherwise)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    pins: dict[str, str] = {}
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.exists():
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        for dep in deps:
            m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(==.+)$", dep.strip())
            if m:
                pins[m.group(1).lower()] = m.group(1) + m.group(2).strip()
    out = []
    for pkg in MODEL_PACKAGES:
        if pkg in pins:
            out.append(pins[pkg])
        else:
            with contextlib.suppress(PackageNotFoundError):
                out.append(f"{pkg}=={version(pkg)}")
    return out


def _log_pyfunc(
    uri: str,
    run_id: str,
    model_dir: Path,
    input_examples: list[str] | None,
    model_config: dict | None,
) -> str:
    """Log the saved folder as an `mlflow.pyfunc` model of the run; returns the model id."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"text": list(input_examples or DEFAULT_EXAMPLES)[:4]})
    config = {"max_new_tokens": 32, "num_beams": 1, "batch_size": 16, **(model_config or {})}
    signature = infer_signature(
        example,
        pd.DataFrame({"generated": ["..."] * len(example)}),
        params={
            "max_new_tokens": int(config["max_new_tokens"]),
            "num_beams": int(config["num_beams"]),
            "batch_size": int(config["batch_size"]),
        },
    )
    active = mlflow.active_run()
    cm = (
        contextlib.nullcontext()
        if active and active.info.run_id == run_id
        else mlflow.start_run(run_id=run_id, nested=active is not None)
    )
    with cm:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(model_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            model_config=config,
        )
    return info.model_id


# ---------------------------------------------------------------------------------------------
# Registry


def register_model(
    run_id: str,
    uri: str,
    registered_model: str,
    tags: dict,
    champion_metric: str = "eval_loss",
    greater_is_better: bool = False,
    token_secret: str | None = None,
    *,
    model_dir: str | Path | None = None,
    retry_for_s: float | None = None,
) -> tuple[str, str]:
    """Register the run's model once (idempotent); alias `candidate`, `champion` if it wins.

    Returns (registered model name, version).
    """
    uri = configure_tracking(uri, token_secret)
    given = scrub(tags, "tag", on_secret="drop")

    def attempt() -> tuple[str, str]:
        client = _client(uri)
        run = client.get_run(run_id)
        clean_tags = {**version_tags_from_params(run.data.params), **given}
        model_id = logged_model_id(client, run_id)
        if model_id is None:
            raise TrackingError(
                f"MLflow run {run_id} has no logged model to register: finish_run() logs it "
                "(re-run the training; it resumes and logs the model)"
            )
        version = _find_version(client, registered_model, run_id)
        if version is None:
            _ensure_registered_model(client, registered_model)
            version = client.create_model_version(
                registered_model,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=clean_tags,
                model_id=model_id,
            )
            version = _one_version_per_run(client, registered_model, run_id, version)
            log.info(
                "registered %s version %s from run %s", registered_model, version.version, run_id
            )
        else:
            log.info(
                "%s version %s already registered for run %s: not registering again",
                registered_model,
                version.version,
                run_id,
            )
        metric_tags = {
            f"metric.{k}": f"{v:.6g}"
            for k, v in run.data.metrics.items()
            if k.startswith("eval_") or k == champion_metric
        }
        for k, v in {**clean_tags, **metric_tags}.items():
            if version.tags.get(k) != v:
                client.set_model_version_tag(registered_model, version.version, k, v)
        _advance_candidate(client, registered_model, version.version)
        _maybe_promote(
            client,
            registered_model,
            version.version,
            run.data.metrics.get(champion_metric),
            champion_metric,
            greater_is_better,
        )
        return registered_model, str(version.version)

    return with_retries(
        attempt, f"registering run {run_id} as {registered_model}", uri, retry_for_s, model_dir
    )


def close_if_logged(run_id: str, uri: str, token_secret: str | None = None) -> bool:
    """When `finish_run` already logged this run's model, mark the run FINISHED and return
    True (a re-run of finished training); else False (the model still has to be logged)."""
    uri = configure_tracking(uri, token_secret)

    def attempt() -> bool:
        client = _client(uri)
        run = client.get_run(run_id)
        if not run.data.tags.get(MODEL_ID_TAG):
            return False
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, "FINISHED")
        return True

    return with_retries(attempt, f"closing MLflow run {run_id}", uri)


def _by_alias(client, name: str, alias: str):
    """The model version `alias` points at, or None when the alias (or model) is not there."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
            "NOT_FOUND",
        ):
            raise
        return None


def _advance_candidate(client, name: str, version: str | int) -> None:
    """`candidate` names the newest registered version: set it unless it already points at
    this version or a newer one (re-running an older training never moves it back)."""
    current = _by_alias(client, name, CANDIDATE)
    if current is None or int(current.version) < int(version):
        client.set_registered_model_alias(name, CANDIDATE, str(version))


def version_tags_from_params(params: dict[str, str]) -> dict[str, str]:
    """Default version tags (objective, language, dataset, base model) from the run's params."""
    language = params.get("source.language")
    if language in (None, "None", ""):
        language = params.get("source.name")
    picked = {
        "objective": params.get("train.objective"),
        "language": language,
        "dataset": params.get("source.dataset"),
        "base_model": params.get("model.name_or_path"),
    }
    return {k: v for k, v in picked.items() if v not in (None, "None", "")}


def _find_version(client, name: str, run_id: str):
    """The lowest version of `name` registered from `run_id`, or None."""
    found = client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _one_version_per_run(client, name: str, run_id: str, created):
    """Two registrations racing on one run: the lowest version wins, ours is deleted."""
    first = _find_version(client, name, run_id)
    if first is not None and str(first.version) != str(created.version):
        client.delete_model_version(name, created.version)
        return first
    return created


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            description="Seq2seq model fine-tuned by the lakehouse pipeline (pyfunc: "
            "DataFrame column `text` in, column `generated` out).",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _quote(text: str) -> str:
    return text.replace("'", "''")


def _maybe_promote(
    client, name: str, version: str, value: float | None, metric: str, greater_is_better: bool
) -> bool:
    """Move alias `champion` to `version` when its metric beats the champion's (or none)."""
    champion = _by_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        return True
    best = _version_metric(client, champion, metric) if champion is not None else None
    if champion is None or (
        value is not None
        and (best is None or (value > best if greater_is_better else value < best))
    ):
        client.set_registered_model_alias(name, CHAMPION, version)
        log.info(
            "%s version %s is the new champion (%s=%s; previous: %s)",
            name,
            version,
            metric,
            value,
            f"v{champion.version} {best}" if champion else "none",
        )
        return True
    log.info(
        "%s version %s stays candidate (%s=%s does not beat champion v%s: %s)",
        name,
        version,
        metric,
        value,
        champion.version,
        best,
    )
    return False


def _version_metric(client, version, metric: str) -> float | None:
    run_id = version.run_id
    if run_id:
        with contextlib.suppress(Exception):
            value = client.get_run(run_id).data.metrics.get(metric)
            if value is not None:
                return float(value)
    tag = (version.tags or {}).get(f"metric.{metric}")
    return float(tag) if tag is not None else None


# ---------------------------------------------------------------------------------------------
# Using the registered model


def load_champion(
    uri: str, registered_model: str, token_secret: str | None = None, alias: str = CHAMPION
):
    """Load `models:/<registered_model>@<alias>` as a pyfunc model."""
    import mlflow

    configure_tracking(uri, token_secret)
    return mlflow.pyfunc.load_model(f"models:/{registered_model}@{alias}")


def generate(model, texts: list[str], **params: Any) -> list[str]:
    """Generate one text per input with a loaded pyfunc model."""
    import pandas as pd

    out = model.predict(pd.DataFrame({"text": list(texts)}), params=params or None)
    return [str(t) for t in out["generated"].tolist()]


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "MlflowMetricsCallback",
    "TrackingError",
    "configure_tracking",
    "finish_run",
    "generate",
    "is_unreachable",
    "lineage_from_manifests",
    "load_champion",
    "pip_requirements",
    "prefect_tags",
    "register_model",
    "scrub",
    "start_run",
    "with_retries",
]
