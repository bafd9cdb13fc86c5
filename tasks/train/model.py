"""The model, its tokenizer and the device: loaded the same way wherever a run happens.

Loading errors become messages about `model.name_or_path` (a typo in a hub id otherwise surfaces
as a deep traceback), and the device and precision are decided once per process from what the
hardware does natively, so `train.device=auto` / `train.precision=auto` give the fast choice
without the user knowing the machine.
"""

from __future__ import annotations

import os
from typing import Any

from tasks.train import ranks
from tasks.train.data import TrainingError


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The model's tokenizer, or a TrainingError naming model.name_or_path."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"model.name_or_path={name_or_path!r}: cannot load its tokenizer ({exc}). Give a "
            "local model folder or a hub id (with network access or a filled HF cache)."
        ) from None


def load_model(name_or_path: str, revision: str | None = None):
    """The seq2seq model with SDPA attention where its class supports it."""
    from transformers import AutoModelForSeq2SeqLM

    try:
        return AutoModelForSeq2SeqLM.from_pretrained(
            name_or_path, revision=revision, attn_implementation="sdpa"
        )
    except ValueError as exc:
        if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
            raise TrainingError(
                f"model.name_or_path={name_or_path!r} is not a sequence-to-sequence model "
                f"(T5/mT5, mBART, ...): {exc}"
            ) from None
    except OSError as exc:
        raise TrainingError(f"model.name_or_path={name_or_path!r}: cannot load ({exc})") from None
    return AutoModelForSeq2SeqLM.from_pretrained(name_or_path, revision=revision)


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matrix maths natively (AMX or AVX512-BF16)."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_BF16_MIN_WIDTH = 256  # model width (d_model) from which bf16 autocast pays on a CPU


def model_width(config) -> int | None:
    """The hidden size of a model config (`d_model` for T5/mBART), if it says."""
    return getattr(config, "d_model", None) or getattr(config, "hidden_size", None)


def resolve_device(
    device: str, precision: str = "auto", width: int | None = None
) -> dict[str, Any]:
    """cuda (tf32 on) or cpu (threads = usable cores over local ranks); bf16 where it pays.

    `precision=auto` trains in bf16 autocast (fp32 master weights, as Trainer's `bf16=True`)
    on GPUs that support it, and on CPUs with AMX or AVX512-BF16 for models at least
    `CPU_BF16_MIN_WIDTH` wide: narrower models spend more on the casts than the matmuls save
    (README's training section has the measurements). fp32 elsewhere. `bf16` insists (an
    error where the hardware has no bf16), `fp32` turns it off.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "gpu" and not has_cuda:
        raise TrainingError(
            "train.device=gpu but no CUDA GPU is visible: use train.device=auto "
            "or cpu, or run on the docker-gpu pool (train.infra=docker-gpu)"
        )
    if device in ("auto", "gpu") and has_cuda:
        # TF32 matmuls on Ampere+ are ~8x faster than fp32 at negligible cost for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        found = {
            "device": "cuda",
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            "gpus": torch.cuda.device_count(),
            "name": torch.cuda.get_device_name(0),
        }
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # Data-parallel ranks on one machine share its cores (2 ranks x 1 thread on 2 cores).
        torch.set_num_threads(max(1, (cores or 1) // ranks.local_world_size()))
        found = {"device": "cpu", "bf16_supported": cpu_has_bf16(), "gpus": 0, "name": "cpu"}
    supported = found.pop("bf16_supported")
    if precision == "bf16" and not supported:
        raise TrainingError(
            f"train.precision=bf16 but this {found['device']} has no native bf16 "
            "(CPUs need AMX or AVX512-BF16, GPUs Ampere or newer): use train.precision=auto"
        )
    pays = found["device"] == "cuda" or (width or 0) >= CPU_BF16_MIN_WIDTH
    found["bf16"] = supported and (precision == "bf16" or (precision == "auto" and pays))
    return found
