"""The run's model in MLflow: the saved Hugging Face folder logged as an `mlflow.pyfunc` model.

MLflow 3's `transformers` flavour does not support transformers 5, so the model is logged as a
"model from code" (tasks/tracking/pyfunc_model.py wraps the folder): it loads with the pinned
packages alone, without this repository. Trainer state (optimizer, RNG, `training_args.bin`,
which pickles a possible hub token) is left out of the logged folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from tasks import REPO_ROOT
from tasks.tracking.runs import MODEL_ID_TAG
from tasks.tracking.server import is_unreachable

PYFUNC_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
MODEL_NAME = "model"  # the logged model's name inside the run
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
MODEL_DEFAULTS = {"max_new_tokens": 32, "num_beams": 1, "batch_size": 16}
DEFAULT_EXAMPLES = [
    "The weather in Paris is <extra_id_0> today.",
    "Le chat dort <extra_id_0> le canapé.",
]
# Files of a Trainer output folder that are not part of the model (and may hold secrets:
# training_args.bin pickles TrainingArguments, hub_token included).
_NOT_MODEL_FILES = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|training_args\.bin|trainer_state\.json|"
    r"scaler\.pt|checkpoint-\d+|runs)$"
)


def stage_model(model_dir: Path, dst: Path) -> Path:
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


def log_pyfunc(
    uri: str,
    run_id: str,
    model_dir: Path,
    input_examples: list[str] | None,
    model_config: dict | None,
) -> str:
    """Log the saved folder as an `mlflow.pyfunc` model of the run; returns the model id.

    `input_examples` should be what the model was trained to take (held-out inputs: sentinels
    for span corruption, `<mask>` for denoising, sources for pairs); `model_config["src_lang"]`
    (mBART) adds the optional `src_lang` column to the signature and the example.
    """
    import mlflow
    import pandas as pd

    config = {**MODEL_DEFAULTS, **(model_config or {})}
    example = pd.DataFrame({"text": list(input_examples or DEFAULT_EXAMPLES)[:4]})
    if config.get("src_lang"):
        example["src_lang"] = config["src_lang"]
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
            signature=model_signature(config),
            input_example=example,
            pip_requirements=pip_requirements(),
            model_config=config,
        )
    return info.model_id


def model_signature(config: dict):
    """Column `text` in (and `src_lang` for mBART), `generated` out; generation params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = [ColSpec("string", "text")]
    params = [
        ParamSpec("max_new_tokens", "long", int(config["max_new_tokens"])),
        ParamSpec("num_beams", "long", int(config["num_beams"])),
        ParamSpec("batch_size", "long", int(config["batch_size"])),
    ]
    if config.get("src_lang"):
        inputs.append(ColSpec("string", "src_lang", required=False))
        params += [
            ParamSpec("src_lang", "string", str(config["src_lang"])),
            ParamSpec("tgt_lang", "string", ""),
        ]
    return ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([ColSpec("string", "generated")]),
        params=ParamSchema(params),
    )
