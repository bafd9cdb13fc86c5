"""Which silver table versions registered models pin (maintenance must keep them loadable)."""

from __future__ import annotations

from collections import defaultdict

from tasks.tracking.server import configure_tracking, mlflow_client

SILVER_TABLE_TAG = "lineage.silver.table"
SILVER_VERSION_TAG = "lineage.silver.version"


def pinned_silver_versions(
    uri: str, registered_model: str, token: str | None
) -> dict[str, list[int]]:
    """silver table URI -> the versions the registered model's versions were trained on.

    A registered model that does not exist yet pins nothing.
    """
    configure_tracking(uri, token)
    client = mlflow_client(uri)
    pins: dict[str, set[int]] = defaultdict(set)
    try:
        versions = client.search_model_versions(f"name = '{registered_model}'")
    except Exception as exc:  # noqa: BLE001 - a missing model is RESOURCE_DOES_NOT_EXIST
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return {}
        raise
    for v in versions:
        tags = client.get_run(v.run_id).data.tags if v.run_id else {}
        table, version = tags.get(SILVER_TABLE_TAG), tags.get(SILVER_VERSION_TAG)
        if table and version is not None and str(version).isdigit():
            pins[table].add(int(version))
    return {t: sorted(vs) for t, vs in pins.items()}
