"""The model registry: one version per MLflow run, alias `candidate` for the newest, and
`champion` for the version that won the comparison (tasks/tracking/promotion.py says when).

Registration is idempotent by run id (a re-run after a crash or an outage never makes a second
version; two racing registrations keep the lowest version), so the flow can always re-run it.
The first version of a registered model becomes champion at once: there is nothing to compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tasks.tracking.logged_model import logged_model_id
from tasks.tracking.scrub import scrub
from tasks.tracking.server import TrackingError, configure_tracking, mlflow_client, with_retries

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"


def register_model(
    run_id: str,
    uri: str,
    registered_model: str,
    tags: dict,
    *,
    token: str | None = None,
    model_dir: str | Path | None = None,
    retry_for_s: float | None = None,
) -> tuple[str, str]:
    """Register the run's model once (idempotent); alias `candidate`, and `champion` when the
    registered model has none yet.

    Returns (registered model name, version).
    """
    uri = configure_tracking(uri, token)
    given = scrub(tags, "tag", on_secret="drop")

    def attempt() -> tuple[str, str]:
        client = mlflow_client(uri)
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
            f"metric.{k}": f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("eval_")
        }
        for k, v in {**clean_tags, **metric_tags}.items():
            if version.tags.get(k) != v:
                client.set_model_version_tag(registered_model, version.version, k, v)
        _advance_candidate(client, registered_model, version.version)
        if _by_alias(client, registered_model, CHAMPION) is None:
            client.set_registered_model_alias(registered_model, CHAMPION, version.version)
            log.info("%s version %s is the first champion", registered_model, version.version)
        return registered_model, str(version.version)

    return with_retries(
        attempt, f"registering run {run_id} as {registered_model}", uri, retry_for_s, model_dir
    )


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


@dataclass(frozen=True)
class VersionRef:
    """A registered version: its number, run and tags."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def champion_of(uri: str, registered_model: str, *, token: str | None = None) -> VersionRef | None:
    """The version alias `champion` points at, or None."""
    uri = configure_tracking(uri, token)

    def attempt() -> VersionRef | None:
        found = _by_alias(mlflow_client(uri), registered_model, CHAMPION)
        if found is None:
            return None
        return VersionRef(
            registered_model, str(found.version), found.run_id or "", dict(found.tags or {})
        )

    return with_retries(attempt, f"reading the champion of {registered_model}", uri)


def version_of(
    uri: str, registered_model: str, version: str, *, token: str | None = None
) -> VersionRef:
    """Version `version` of `registered_model`."""
    uri = configure_tracking(uri, token)

    def attempt() -> VersionRef:
        found = mlflow_client(uri).get_model_version(registered_model, version)
        return VersionRef(registered_model, str(version), found.run_id or "", dict(found.tags))

    return with_retries(attempt, f"reading {registered_model} version {version}", uri)


def record_promotion(
    uri: str,
    registered_model: str,
    version: str,
    *,
    tags: dict[str, str],
    description: str,
    promote: bool,
    token: str | None = None,
    retry_for_s: float | None = None,
) -> None:
    """Write the comparison onto the version (tags, model card) and move `champion` when it won.

    Tags and description go first: a crash before the alias moves leaves the decision recorded,
    and a re-run (which compares again) finishes the move.
    """
    uri = configure_tracking(uri, token)
    clean = scrub(tags, "tag", on_secret="drop")

    def attempt() -> None:
        client = mlflow_client(uri)
        current = client.get_model_version(registered_model, version)
        for k, v in clean.items():
            if current.tags.get(k) != v:
                client.set_model_version_tag(registered_model, version, k, v)
        if current.description != description:
            client.update_model_version(registered_model, version, description=description)
        if promote:
            client.set_registered_model_alias(registered_model, CHAMPION, version)
            log.info("%s version %s is the new champion", registered_model, version)

    with_retries(
        attempt, f"recording the promotion of {registered_model} v{version}", uri, retry_for_s
    )
