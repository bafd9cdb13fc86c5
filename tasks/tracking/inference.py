"""Using a registered model: load `models:/<name>@<alias>` and generate text with it.

The same pyfunc model that `make serve` puts behind REST, loaded in this process.
"""

from __future__ import annotations

from typing import Any

from tasks.tracking.registry import CHAMPION
from tasks.tracking.server import configure_tracking


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
