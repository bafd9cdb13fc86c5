"""Using a registered model: load it, generate with it, fetch its folder, serve it over REST.

The pyfunc model that `make serve` puts behind REST is the one `load_champion` loads here; the
champion's Hugging Face folder is fetched to score it on a candidate's held-out rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tasks.tracking.registry import CHAMPION
from tasks.tracking.server import configure_tracking, with_retries


def load_champion(
    uri: str, registered_model: str, *, token: str | None = None, alias: str = CHAMPION
):
    """Load `models:/<registered_model>@<alias>` as a pyfunc model."""
    import mlflow

    configure_tracking(uri, token)
    return mlflow.pyfunc.load_model(f"models:/{registered_model}@{alias}")


def generate(model, texts: list[str], **params: Any) -> list[str]:
    """Generate one text per input with a loaded pyfunc model."""
    import pandas as pd

    out = model.predict(pd.DataFrame({"text": list(texts)}), params=params or None)
    return [str(t) for t in out["generated"].tolist()]


def download_model_folder(
    uri: str, registered_model: str, version: str, dst: Path, *, token: str | None = None
) -> Path:
    """The Hugging Face folder inside version `version`'s pyfunc model, downloaded to `dst`."""
    import mlflow
    import yaml

    configure_tracking(uri, token)
    root = Path(
        with_retries(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{registered_model}/{version}", dst_path=str(dst)
            ),
            f"downloading {registered_model} version {version}",
            uri,
        )
    )
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    artifacts = mlmodel["flavors"]["python_function"]["artifacts"]
    return root / artifacts["model"]["path"]


def serve_command(registered_model: str, *, alias: str = CHAMPION, port: int = 5001) -> list[str]:
    """`mlflow models serve` of `models:/<name>@<alias>` on 127.0.0.1, in this environment."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow_bin),
        "models",
        "serve",
        "-m",
        f"models:/{registered_model}@{alias}",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
