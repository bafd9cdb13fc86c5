"""The same tracking and registry path on an MLflow server backed by PostgreSQL."""

from __future__ import annotations

import uuid

from tasks.tracking import registry, runs
from tasks.tracking.callback import MlflowMetricsCallback
from tasks.tracking.inference import generate, load_champion
from tests.integration.test_tracking import PROMPTS, expected_generation, finish


def test_postgres_run_register_once_and_generate(mlflow_server_pg, tiny_models, tmp_path):
    from mlflow import MlflowClient

    uri, name = mlflow_server_pg.uri, f"pg-{uuid.uuid4().hex[:6]}"
    key = f"pg-{uuid.uuid4().hex[:8]}"
    run_id = runs.start_run(
        uri, "tracking-pg", key, {"train.max_steps": 4}, {"objective": "span_corruption"}
    )
    callback = MlflowMetricsCallback(run_id, uri)
    callback.add({"loss": 3.0, "learning_rate": 1e-3}, 1)
    callback.add({"loss": 2.5, "eval_loss": 2.7}, 2)
    assert callback.flush()
    assert runs.start_run(uri, "tracking-pg", key, {}, {}) == run_id
    finish(uri, run_id, tiny_models["t5"], tmp_path, 2.7)
    tags = {"objective": "span_corruption", "language": "multi", "dataset": "json"}
    got = registry.register_model(run_id, uri, name, tags)
    assert registry.register_model(run_id, uri, name, tags) == got == (name, "1")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (mv,) = client.search_model_versions(f"name = '{name}'")
    assert mv.tags["language"] == "multi"
    assert sorted(client.get_registered_model(name).aliases) == ["candidate", "champion"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    model = load_champion(uri, name)
    generated = generate(model, PROMPTS, max_new_tokens=4)
    assert generated == expected_generation(tiny_models["t5"], PROMPTS, max_new_tokens=4)
