"""Fine-tune a seq2seq model on committed silver with Seq2SeqTrainer; resumable checkpoints.

A batch's trip: silver parquet (`input_ids`, `labels`) -> `build_datasets` packs documents into
fixed-length chunks (span corruption, denoising) or truncates pairs (supervised) -> the
objective's collator draws noise per batch from (seed, epoch, batch) -> `LakehouseTrainer`
counts useful tokens and steps the model. Checkpoints get a `_COMPLETE` marker after Trainer has
written every file (and, for an az:// lakehouse, after the upload), so resume never picks a
half-written one.

`python -m tasks.train.run SPEC.json RESULT.json` runs `train_model` from a JSON spec; the flow
uses it to start one process per GPU with torchrun when several GPUs are visible.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.lakehouse.layout import models_dir, stable_id
from tasks.lakehouse.manifest import Manifest
from tasks.lakehouse.storage import Lakehouse, open_lakehouse
from tasks.train.collators import (
    LABEL_PAD_ID,
    DenoisingCollator,
    SpanCorruptionCollator,
    SupervisedCollator,
    compute_t5_input_and_target_lengths,
    pack_documents,
)
from tasks.train.data import (
    PAIR_COLUMNS,
    TRAIN_COLUMNS,
    TrainingError,
    find_silver,
    read_silver,
    silver_columns,
    slug,
    split_by_row_id,
    tokenizer_fingerprint,
    tokenizer_key,
)
from tasks.train.metrics import (
    TokenMeter,
    encoder_decoder_params,
    mfu,
    peak_flops,
    plot_loss_curve,
    train_flops,
)

log = logging.getLogger(__name__)

__all__ = [
    "TrainingError",
    "CheckpointStore",
    "plan_training",
    "train_model",
    "objective_lengths",
    "build_datasets",
    "build_collators",
]

COMPLETE = "_COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL = "final"
RESULT_FILE = "train_result.json"
METER_FILE = "token_meter.json"
LOSS_CURVE = "loss_curve.png"
# Settings that change what a run computes; the rest (device, save/eval/log cadence, where
# checkpoints go) may differ between an interrupted run and its resumption.
RUN_IDENTITY_KEYS = (
    "objective",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "seed",
    "eval_fraction",
    "noise_density",
    "mean_noise_span_length",
    "mask_ratio",
    "poisson_lambda",
)
MIN_DENOISING_LENGTH = 8
SENTENCE_ENDS = {".", "!", "?", "。", "！", "？", "؟", "।"}


def work_dir() -> Path:
    """Local scratch for training (checkpoints of az:// runs, datasets cache)."""
    d = Path(os.environ.get("LAKEHOUSE_WORK_DIR", ".work")) / "train"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


# --------------------------------------------------------------------------------------------
# Model, tokenizer, device
# --------------------------------------------------------------------------------------------


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
    """cuda (tf32 on) or cpu (threads = usable cores); bf16 mixed precision where it pays.

    `precision=auto` trains in bf16 autocast (fp32 master weights, as Trainer's `bf16=True`)
    on GPUs that support it, and on CPUs with AMX or AVX512-BF16 for models at least
    `CPU_BF16_MIN_WIDTH` wide: there a step of the benchmark's d_model-256 T5 took 0.42 s
    instead of 0.66-0.72 s, while on the d_model-64 test models the casts cost more than the
    matmuls save (about half the speed). fp32 elsewhere. `bf16` insists (an error where the
    hardware has no bf16), `fp32` turns it off.
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
        torch.set_num_threads(max(1, cores or 1))
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


# --------------------------------------------------------------------------------------------
# Objectives: lengths, fit checks, datasets, collators
# --------------------------------------------------------------------------------------------


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... present in the tokenizer."""
    vocab = tokenizer.get_vocab()
    out = []
    while f"<extra_id_{len(out)}>" in vocab:
        out.append(vocab[f"<extra_id_{len(out)}>"])
    return out


def objective_lengths(
    objective: str,
    max_source_length: int,
    max_target_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> dict[str, int]:
    """Chunk and model lengths for the objective; TrainingError when they are too small."""
    if objective == "span_corruption":
        raw, target = compute_t5_input_and_target_lengths(
            max_source_length, noise_density, mean_noise_span_length
        )
        if raw < 4 or target < 2:
            raise TrainingError(
                f"model.max_source_length={max_source_length} is too small for "
                "span corruption: use at least 16"
            )
        if max_target_length < target:
            raise TrainingError(
                f"lengths too small: span corruption of model.max_source_length="
                f"{max_source_length} gives targets of {target} tokens, but "
                f"model.max_target_length={max_target_length}; set model.max_target_length>="
                f"{target} (or lower max_source_length)"
            )
        return {"chunk_length": raw, "input_length": max_source_length, "target_length": target}
    if objective == "denoising":
        chunk = max_source_length - 2  # room for </s> and the language code
        if chunk < MIN_DENOISING_LENGTH:
            raise TrainingError(
                f"lengths too small: denoising needs model.max_source_length>="
                f"{MIN_DENOISING_LENGTH + 2}, got {max_source_length}"
            )
        if max_target_length < max_source_length:
            raise TrainingError(
                f"lengths too small: denoising reconstructs the whole chunk, so "
                f"model.max_target_length={max_target_length} must be >= "
                f"model.max_source_length={max_source_length}"
            )
        return {
            "chunk_length": chunk,
            "input_length": max_source_length,
            "target_length": max_source_length,
        }
    if max_source_length < 2 or max_target_length < 2:
        raise TrainingError(
            "lengths too small: supervised needs max_source_length and "
            "max_target_length of at least 2"
        )
    return {
        "chunk_length": 0,
        "input_length": max_source_length,
        "target_length": max_target_length,
    }


def check_objective(
    objective: str,
    tokenizer,
    columns: set[str],
    model_name: str,
    max_source_length: int,
    noise_density: float,
    mean_noise_span_length: float,
) -> None:
    """Raise a TrainingError when the objective does not fit the model or the silver."""
    if objective == "span_corruption":
        sentinels = sentinel_ids(tokenizer)
        if not sentinels:
            raise TrainingError(
                f"train.objective=span_corruption needs T5 sentinel tokens (<extra_id_0>...), "
                f"which the tokenizer of {model_name} lacks: use a T5/mT5 model or "
                "train.objective=denoising (mBART) / supervised"
            )
        raw, _ = compute_t5_input_and_target_lengths(
            max_source_length, noise_density, mean_noise_span_length
        )
        spans = max(1, round(round(raw * noise_density) / mean_noise_span_length))
        if spans > len(sentinels):
            raise TrainingError(
                f"model.max_source_length={max_source_length} needs {spans} sentinels per "
                f"example but the tokenizer has {len(sentinels)}: lower max_source_length"
            )
    elif objective == "denoising":
        if tokenizer.mask_token_id is None:
            raise TrainingError(
                f"train.objective=denoising needs a <mask> token, which the tokenizer of "
                f"{model_name} lacks: use a BART/mBART model or train.objective=span_corruption"
            )
    elif objective == "supervised":
        if columns and "labels" not in columns:
            raise TrainingError(
                "train.objective=supervised needs source/target pairs, but this silver has no "
                "`labels` column: ingest pairs with source.target_column set and rebuild silver"
            )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise TrainingError(f"the tokenizer of {model_name} has no EOS or pad token")


def language_code_id(tokenizer, docs: list[list[int]]) -> int | None:
    """The language code an mBART tokenizer appended after `</s>` in silver, if any."""
    specials = set(tokenizer.all_special_ids) - {
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
    }
    tails = Counter(d[-1] for d in docs if len(d) >= 2 and d[-2] == tokenizer.eos_token_id)
    for token, _ in tails.most_common():
        if token in specials:
            return int(token)
    return None


def sentence_end_ids(tokenizer) -> list[int]:
    """Ids of pieces that end a sentence (".", "▁.", "!", ...)."""
    return sorted(
        i for piece, i in tokenizer.get_vocab().items() if piece.lstrip("▁Ġ") in SENTENCE_ENDS
    )


def _pack_batch(
    batch: dict[str, list], chunk_length: int, eos_id: int, drop_ids: list[int]
) -> dict[str, list]:
    chunks = list(pack_documents(batch["input_ids"], chunk_length, eos_id, drop_ids))
    return {"input_ids": chunks}


def _truncate_pairs(
    batch: dict[str, list], max_source: int, max_target: int, eos_id: int
) -> dict[str, list]:
    def cut(ids: list[int], n: int) -> list[int]:
        # Keep the final EOS (and an mBART language code after it) when truncating.
        if len(ids) <= n:
            return list(ids)
        tail = ids[ids.index(eos_id, max(0, len(ids) - 2)) :] if eos_id in ids[-2:] else []
        return list(ids[: n - len(tail)]) + list(tail)

    src = [cut(x, max_source) for x in batch["input_ids"]]
    tgt = [cut(y, max_target) for y in batch["labels"]]
    # Inputs and labels pad separately: `length` carries both (see pair_batch_order).
    return {
        "input_ids": src,
        "labels": tgt,
        "length": [len(b) * PAIR_LENGTH_BASE + len(a) for a, b in zip(src, tgt, strict=True)],
    }


PAIR_LENGTH_BASE = 1 << 16  # `length` = label length * base + input length
PAIR_WINDOW = 4  # batches whose inputs are re-sorted together after the sort by label length


def pair_batch_order(lengths: Sequence[int], batch_size: int, generator=None) -> list[int]:
    """Indices in batches of similar input *and* label lengths, batches in random order.

    Inputs and labels are padded separately, so sorting by one length leaves the other ragged
    (Trainer's `group_by_length` sorts by one number within mega-batches of 50 batches and
    keeps them in length order). Here: sort everything by label length, then input length
    (ties in random order), re-sort windows of `PAIR_WINDOW` batches by input length, cut into
    batches and shuffle the batches; the largest batch goes first (memory errors show at
    once). On the sample's pairs (batch 8) that fills 0.94 of the slots: label-then-input
    alone 0.91, their sum 0.86, random batches 0.44. Draws from `generator` (torch's global
    RNG by default, which Trainer seeds and restores on resume).
    """
    import numpy as np
    import torch

    n = len(lengths)
    if n == 0:
        return []
    key = np.asarray(lengths, dtype=np.int64)
    label, source = key // PAIR_LENGTH_BASE, key % PAIR_LENGTH_BASE
    perm = torch.randperm(n, generator=generator).numpy()
    order = perm[np.lexsort((source[perm], label[perm]))]
    window = PAIR_WINDOW * batch_size
    for i in range(0, n, window):
        part = order[i : i + window]
        order[i : i + window] = part[np.argsort(source[part], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    largest = max(
        range(len(shuffled)),
        key=lambda j: len(shuffled[j]) * (label[shuffled[j]].max() + source[shuffled[j]].max()),
    )
    shuffled[0], shuffled[largest] = shuffled[largest], shuffled[0]
    return np.concatenate(shuffled).tolist()


def build_datasets(
    ds,
    objective: str,
    tokenizer,
    lengths: Mapping[str, int],
    eval_fraction: float,
    max_eval_samples: int,
    drop_ids: list[int] = (),
) -> tuple[Any, Any]:
    """(train, eval) datasets ready for the objective's collator."""
    train, evals = split_by_row_id(ds, eval_fraction, max_eval_samples)
    eos = tokenizer.eos_token_id
    out = []
    for part in (train, evals):
        if objective == "supervised":
            part = part.map(
                _truncate_pairs,
                batched=True,
                batch_size=2000,
                remove_columns=part.column_names,
                desc="truncate pairs",
                fn_kwargs={
                    "max_source": lengths["input_length"],
                    "max_target": lengths["target_length"],
                    "eos_id": eos,
                },
            )
        else:
            # Batched map packs within 2,000-document slices (one partial chunk lost per
            # slice, as run_t5_mlm_flax's group_texts); cached by datasets' fingerprint.
            part = part.map(
                _pack_batch,
                batched=True,
                batch_size=2000,
                remove_columns=part.column_names,
                desc="pack documents",
                fn_kwargs={
                    "chunk_length": lengths["chunk_length"],
                    "eos_id": eos,
                    "drop_ids": list(drop_ids),
                },
            )
        out.append(part)
    train, evals = out
    if len(train) == 0:
        unit = (
            "pairs"
            if objective == "supervised"
            else (f"chunks of {lengths['chunk_length']} tokens")
        )
        raise TrainingError(
            f"silver gives no training {unit} ({len(ds)} rows, {len(evals)} held out for eval): "
            "add data (bronze, silver) or lower model.max_source_length / train.eval_fraction"
        )
    return train, evals


def build_collators(
    objective: str,
    tokenizer,
    lengths: Mapping[str, int],
    train: Mapping,
    lang_id: int | None = None,
) -> tuple[Callable, Callable]:
    """(train collator, eval collator): separate instances so eval noise stays fixed."""
    seed = int(train["seed"])

    def make(s: int) -> Callable:
        if objective == "span_corruption":
            return SpanCorruptionCollator(
                sentinel_ids(tokenizer),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                lengths["input_length"],
                lengths["target_length"],
                noise_density=train["noise_density"],
                mean_noise_span_length=train["mean_noise_span_length"],
                seed=s,
            )
        if objective == "denoising":
            return DenoisingCollator(
                tokenizer.mask_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                lang_id,
                sentence_end_ids(tokenizer),
                mask_ratio=train["mask_ratio"],
                poisson_lambda=train["poisson_lambda"],
                seed=s,
            )
        return SupervisedCollator(tokenizer.pad_token_id)

    return make(seed), make(seed + 1)


# --------------------------------------------------------------------------------------------
# Checkpoints: complete-marker, upload, pick the last good one
# --------------------------------------------------------------------------------------------


def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def verify_checkpoint(folder: Path, step: int | None = None) -> str | None:
    """Why the local checkpoint cannot be resumed from, or None when it is sound."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "no _COMPLETE marker (half-written)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable _COMPLETE marker"
    actual = _file_sizes(folder)
    for name, size in expected.items():
        if actual.get(name) != size:
            return f"{name} missing or of a different size than when it was written"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json missing or not JSON"
    if step is not None and state.get("global_step") != step:
        return f"trainer_state.json says step {state.get('global_step')}, folder says {step}"
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        return "no model weights"
    for w in weights:
        if w.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(w), "pt") as fh:
                    fh.keys()
            except Exception as exc:  # noqa: BLE001 - any parse failure means corrupt
                return f"{w.name} does not load ({type(exc).__name__})"
    if not (folder / "optimizer.pt").is_file() or not (folder / "scheduler.pt").is_file():
        return "optimizer or scheduler state missing"
    return None


class CheckpointStore:
    """Checkpoints of one run: a local folder Trainer writes, mirrored to the lakehouse if remote.

    Local lakehouse: Trainer writes into the lakehouse folder itself and the marker goes next to
    the files. az:// lakehouse: Trainer writes into `.work/train/<run>`; each complete checkpoint
    is uploaded file by file, the marker last.
    """

    def __init__(
        self, local_dir: Path, lake: Lakehouse | None = None, remote_rel: str | None = None
    ):
        self.local_dir = Path(local_dir)
        self.lake = lake if remote_rel is not None else None
        self.remote_rel = remote_rel

    @property
    def uri(self) -> str:
        return self.lake.uri(self.remote_rel) if self.lake else str(self.local_dir)

    def mark_complete(self, folder: Path) -> None:
        """Write the marker (file sizes) after every file; upload first when remote."""
        marker = json.dumps({"files": _file_sizes(folder), "completed_at": time.time()})
        if self.lake is not None:
            rel = f"{self.remote_rel}/{folder.name}"
            for name in _file_sizes(folder):
                self.lake.put_file(folder / name, f"{rel}/{name}")
            self.lake.write_bytes(f"{rel}/{COMPLETE}", marker.encode())
        tmp = folder / f".{COMPLETE}.tmp"
        tmp.write_text(marker)
        os.replace(tmp, folder / COMPLETE)

    def prune_remote(self) -> None:
        """Drop remote checkpoints that Trainer rotated away locally."""
        if self.lake is None:
            return
        keep = {p.name for p in self.local_dir.glob("checkpoint-*")}
        for name in self.lake.listdir(self.remote_rel):
            if checkpoint_step(name) is not None and name not in keep:
                self.lake.rm(f"{self.remote_rel}/{name}")

    def steps(self) -> list[int]:
        """Checkpoint steps with a complete marker, newest first (remote when remote)."""
        if self.lake is not None:
            names = [
                n
                for n in self.lake.listdir(self.remote_rel)
                if checkpoint_step(n) is not None
                and self.lake.exists(f"{self.remote_rel}/{n}/{COMPLETE}")
            ]
        else:
            names = [
                p.name for p in self.local_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()
            ]
        return sorted((checkpoint_step(n) for n in names), reverse=True)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, local (downloaded first if remote)."""
        for step in self.steps():
            folder = self.local_dir / f"checkpoint-{step}"
            if self.lake is not None and verify_checkpoint(folder, step) is not None:
                self._download(f"{self.remote_rel}/checkpoint-{step}", folder)
            problem = verify_checkpoint(folder, step)
            if problem is None:
                return folder
            log.warning("checkpoint %s/checkpoint-%d skipped: %s", self.uri, step, problem)
        return None

    def clean_after(self, step: int | None) -> None:
        """Remove checkpoints that are half-written or newer than the one we resume from."""
        for p in self.local_dir.glob("checkpoint-*"):
            s = checkpoint_step(p.name)
            if s is not None and (step is None or s > step or verify_checkpoint(p, s)):
                shutil.rmtree(p, ignore_errors=True)
        if self.lake is not None:
            for name in self.lake.listdir(self.remote_rel):
                s = checkpoint_step(name)
                if s is not None and (step is None or s > step):
                    self.lake.rm(f"{self.remote_rel}/{name}")

    def _download(self, rel: str, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        marker = json.loads(self.lake.read_bytes(f"{rel}/{COMPLETE}"))
        for name in marker.get("files", {}):
            self.lake.get_file(f"{rel}/{name}", folder / name)
        (folder / COMPLETE).write_text(json.dumps(marker))

    def publish(self, local: Path, rel_name: str) -> str:
        """Upload a finished file or folder (final model, curve, result); returns its URI."""
        if self.lake is None:
            return str(local)
        dest = f"{self.remote_rel}/{rel_name}"
        if local.is_dir():
            for name in _file_sizes(local):
                self.lake.put_file(local / name, f"{dest}/{name}")
            if (local / COMPLETE).is_file():
                self.lake.put_file(local / COMPLETE, f"{dest}/{COMPLETE}")
        else:
            self.lake.put_file(local, dest)
        return self.lake.uri(dest)

    def finished_result(self) -> dict[str, Any] | None:
        """The stored result of a run that already finished (final model complete)."""
        try:
            if self.lake is not None:
                if not self.lake.exists(f"{self.remote_rel}/{FINAL}/{COMPLETE}"):
                    return None
                return json.loads(self.lake.read_bytes(f"{self.remote_rel}/{RESULT_FILE}"))
            if not (self.local_dir / FINAL / COMPLETE).is_file():
                return None
            return json.loads((self.local_dir / RESULT_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None


# --------------------------------------------------------------------------------------------
# Planning: which silver, which run, where its checkpoints live
# --------------------------------------------------------------------------------------------


def run_identity(
    table: str, batch_ids: list[str], model_name: str, model: Mapping, train: Mapping
) -> str:
    """Stable run name: same silver batches, model and training settings -> same name."""
    key = stable_id(
        table,
        ",".join(sorted(batch_ids)),
        model_name,
        model.get("max_source_length"),
        model.get("max_target_length"),
        *[f"{k}={train.get(k)}" for k in RUN_IDENTITY_KEYS],
        length=12,
    )
    base = Path(model_name.rstrip("/")).name or model_name
    return f"{slug(base)}-{train['objective']}-{key}"


def plan_training(
    root: str,
    block: str | None,
    dataset_key: str,
    language: str,
    model: Mapping[str, Any],
    train: Mapping[str, Any],
) -> dict[str, Any]:
    """Find the silver for the model's tokenizer, check the objective; name the run."""
    lake = open_lakehouse(root, block)
    name = model["name_or_path"]
    tokenizer = load_tokenizer(name, model.get("revision"))
    fingerprint = tokenizer_fingerprint(tokenizer)
    tok_key = tokenizer_key(name, tokenizer)
    table, manifests = find_silver(lake, dataset_key, language, tok_key, name, fingerprint)
    columns = silver_columns(manifests)
    check_objective(
        train["objective"],
        tokenizer,
        columns,
        name,
        model["max_source_length"],
        train["noise_density"],
        train["mean_noise_span_length"],
    )
    lengths = objective_lengths(
        train["objective"],
        model["max_source_length"],
        model["max_target_length"],
        train["noise_density"],
        train["mean_noise_span_length"],
    )
    batch_ids = [m.batch_id for m in manifests]
    run_name = run_identity(table, batch_ids, name, model, train)
    output = train.get("output_dir")
    if output and output.startswith("az://"):
        remote_rel, local_dir = lake.rel(output), work_dir() / run_name
    elif output:
        remote_rel, local_dir = None, Path(output).expanduser().resolve()
    elif lake.is_local:
        remote_rel, local_dir = None, lake.local_path(models_dir(run_name))
    else:
        remote_rel, local_dir = models_dir(run_name), work_dir() / run_name
    return {
        "root": root,
        "block": block,
        "table": table,
        "table_uri": lake.uri(table),
        "tokenizer_key": tok_key,
        "tokenizer_fingerprint": fingerprint,
        "batch_ids": batch_ids,
        "rows": sum(m.rows for m in manifests),
        "manifests": [json.loads(m.to_bytes()) for m in manifests],
        "columns": sorted(columns),
        "lengths": lengths,
        "run_name": run_name,
        "local_dir": str(local_dir),
        "remote_rel": remote_rel,
        "output_uri": lake.uri(remote_rel) if remote_rel else str(local_dir),
    }


# --------------------------------------------------------------------------------------------
# The trainer and its callbacks
# --------------------------------------------------------------------------------------------


def _trainer_class():
    from transformers import Seq2SeqTrainer

    class LakehouseTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer that counts useful tokens and evaluates with fixed-noise batches."""

        def __init__(
            self,
            *args,
            eval_collator=None,
            pad_id: int | None = None,
            prior_meter: TokenMeter | None = None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.eval_collator = eval_collator
            self.pad_id = pad_id
            self.meter = TokenMeter()
            self.prior_meter = prior_meter or TokenMeter()
            self.eval_seconds = 0.0
            self.loop_started: float | None = None

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if (
                self.args.train_sampling_strategy == "group_by_length"
                and self.args.world_size <= 1
                and "length" in ds.column_names
            ):
                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return _pair_length_sampler(list(ds["length"]), batch)
            return super()._get_train_sampler(train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.loop_started is None:  # the clock starts with the first batch
                self.loop_started = time.perf_counter()
            self.meter.add(inputs, self.pad_id)
            return super().training_step(model, inputs, num_items_in_batch)

        def evaluate(self, *args, **kwargs):
            started = time.perf_counter()
            train_collator = self.data_collator
            if self.eval_collator is not None:
                if hasattr(self.eval_collator, "set_epoch"):
                    self.eval_collator.set_epoch(0)  # same noise every evaluation: comparable
                self.data_collator = self.eval_collator
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.data_collator = train_collator
                self.eval_seconds += time.perf_counter() - started

        def total_meter(self) -> TokenMeter:
            """Tokens over all processes and, after a resume, the earlier runs too."""
            return self.prior_meter.merged(self.run_meter())

        def run_meter(self) -> TokenMeter:
            if self.args.world_size <= 1:
                return self.meter
            import torch

            values = torch.tensor(
                [getattr(self.meter, k) for k in TokenMeter.__dataclass_fields__],
                device=self.args.device,
                dtype=torch.long,
            )
            values = self.accelerator.reduce(values, reduction="sum")
            return TokenMeter(*[int(v) for v in values.tolist()])

        def train_seconds(self) -> float:
            if self.loop_started is None:
                return 1e-9
            return max(time.perf_counter() - self.loop_started - self.eval_seconds, 1e-9)

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs and self.args.world_size <= 1:
                total = self.total_meter()
                logs["tokens_seen"] = total.tokens
                logs["tokens_per_second"] = round(self.meter.tokens / self.train_seconds(), 2)
                if total.nonpad_fraction is not None:
                    logs["nonpad_fraction"] = round(total.nonpad_fraction, 4)
            super().log(logs, *args, **kwargs)

    return LakehouseTrainer


def _pair_length_sampler(lengths: list[int], batch_size: int):
    """A Trainer sampler over `pair_batch_order` (a new order each epoch)."""
    from torch.utils.data import Sampler

    class PairLengthSampler(Sampler):
        def __len__(self) -> int:
            return len(lengths)

        def __iter__(self):
            return iter(pair_batch_order(lengths, batch_size))

    return PairLengthSampler()


def _callbacks(collator, store: CheckpointStore, resume_step: int):
    from transformers import TrainerCallback

    class EpochNoiseCallback(TrainerCallback):
        """Re-seed the collator each epoch (Trainer does not); mid-epoch on resume."""

        def __init__(self) -> None:
            self.epoch: int | None = None

        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if not hasattr(collator, "set_epoch"):
                return
            if self.epoch is None:
                ga = args.gradient_accumulation_steps
                batches = len(train_dataloader) if train_dataloader is not None else 0
                per_epoch = max(math.ceil(batches / ga), 1) if batches else 1
                self.epoch = state.global_step // per_epoch
                skipped = (state.global_step % per_epoch) * ga if resume_step else 0
                collator.set_epoch(self.epoch, start_batch=skipped)
            else:
                self.epoch += 1
                collator.set_epoch(self.epoch)

    class CompleteCheckpointCallback(TrainerCallback):
        """After Trainer saved a checkpoint: token counts, then the _COMPLETE marker (+upload)."""

        def __init__(self) -> None:
            self.trainer = None

        def on_save(self, args, state, control, **kwargs):
            meter = self.trainer.total_meter() if self.trainer is not None else None
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                return
            if meter is not None:
                (folder / METER_FILE).write_text(json.dumps(meter.to_dict()))
            store.mark_complete(folder)
            store.prune_remote()

    return EpochNoiseCallback(), CompleteCheckpointCallback()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _sacrebleu_metrics(tokenizer) -> Callable:
    import numpy as np
    import sacrebleu

    def compute(pred) -> dict[str, float]:
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(pred.label_ids == LABEL_PAD_ID, tokenizer.pad_token_id, pred.label_ids)
        hyp = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        ref = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": sacrebleu.corpus_bleu(hyp, [ref]).score,
            "chrf": sacrebleu.corpus_chrf(hyp, [ref]).score,
        }

    return compute


def training_arguments(
    local_dir: Path,
    train: Mapping[str, Any],
    device: Mapping[str, Any],
    has_eval: bool,
    objective: str,
    **overrides: Any,
):
    """Seq2SeqTrainingArguments from train.* (extra_args pass through by their own names)."""
    from transformers import Seq2SeqTrainingArguments

    cpu = device["device"] == "cpu"
    kwargs: dict[str, Any] = {
        "output_dir": str(local_dir),
        "max_steps": train["max_steps"],
        "per_device_train_batch_size": train["batch_size"],
        "per_device_eval_batch_size": train["batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "learning_rate": train["learning_rate"],
        "weight_decay": train["weight_decay"],
        "warmup_steps": train["warmup_steps"],
        "lr_scheduler_type": train["lr_scheduler_type"],
        "seed": train["seed"],
        "data_seed": train["seed"],
        "save_strategy": "steps",
        "save_steps": train["save_steps"],
        "save_total_limit": train.get("save_total_limit"),
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": train["eval_steps"],
        "logging_steps": train["logging_steps"],
        "logging_first_step": True,
        "report_to": "none",
        "disable_tqdm": False,
        "use_cpu": cpu,
        "bf16": bool(device.get("bf16")),
        "dataloader_num_workers": train.get("dataloader_num_workers", 0),
        "dataloader_persistent_workers": False,  # workers must see set_epoch (collators doc)
        "remove_unused_columns": False,
        "predict_with_generate": objective == "supervised",
        "generation_max_length": train.get("generation_max_length", 64),
        "generation_num_beams": train.get("num_beams", 1),
    }
    if objective == "supervised":
        kwargs.update(train_sampling_strategy="group_by_length", length_column_name="length")
    kwargs.update(train.get("extra_args") or {})
    kwargs.update(overrides)
    try:
        return Seq2SeqTrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(
            f"invalid training settings (train.* / train.extra_args): {exc}"
        ) from None


def local_final_model(plan: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
    """The finished run's final model as a local folder (downloaded from the lakehouse when
    this machine does not have it, e.g. a re-run elsewhere after a crash during tracking)."""
    folder = Path(result["final_model_dir"])
    if (folder / COMPLETE).is_file():
        return folder
    store = CheckpointStore(
        Path(plan["local_dir"]), open_lakehouse(plan["root"], plan["block"]), plan.get("remote_rel")
    )
    if store.lake is None:
        raise TrainingError(
            f"{folder}: the final model is missing; re-train with train.resume=never"
        )
    folder = store.local_dir / FINAL
    store._download(f"{store.remote_rel}/{FINAL}", folder)
    return folder


def train_model(
    plan: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train: Mapping[str, Any],
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train (or resume) the planned run; returns the metrics and where things are."""
    from transformers import set_seed

    objective = train["objective"]
    lake = open_lakehouse(plan["root"], plan["block"])
    store = CheckpointStore(Path(plan["local_dir"]), lake, plan.get("remote_rel"))
    store.local_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0

    if train.get("resume", "auto") == "auto":
        done = store.finished_result()
        if done is not None:
            done["message"] = f"already trained: {store.uri}/{FINAL} (train.resume=never retrains)"
            done["already_trained"] = True
            return done
        resume_from = store.latest()
    else:
        resume_from = None
    resume_step = checkpoint_step(resume_from.name) if resume_from else None
    if is_main:
        store.clean_after(resume_step)

    set_seed(int(train["seed"]))
    name = model_params["name_or_path"]
    tokenizer = load_tokenizer(name, model_params.get("revision"))
    model = load_model(name, model_params.get("revision"))
    device = resolve_device(
        train.get("device", "auto"), train.get("precision", "auto"), model_width(model.config)
    )
    log.info(
        "training %s on %s (%d GPU), %s",
        plan["run_name"],
        device["name"],
        device["gpus"],
        "bf16 mixed precision" if device["bf16"] else "fp32",
    )
    lengths = plan["lengths"]

    manifests = [Manifest.model_validate(m) for m in plan["manifests"]]
    columns = TRAIN_COLUMNS + (PAIR_COLUMNS if objective == "supervised" else [])
    cache = work_dir() / "datasets"
    silver = read_silver(lake, manifests, columns, cache)
    docs_head = [list(x) for x in silver.select(range(min(len(silver), 200)))["input_ids"]]
    lang_id = language_code_id(tokenizer, docs_head) if objective != "span_corruption" else None
    drop = [lang_id] if lang_id is not None else []
    train_ds, eval_ds = build_datasets(
        silver,
        objective,
        tokenizer,
        lengths,
        train["eval_fraction"],
        train["max_eval_samples"],
        drop,
    )
    train_collator, eval_collator = build_collators(objective, tokenizer, lengths, train, lang_id)
    if objective == "supervised" and lang_id is not None:
        # mBART pairs: the decoder starts from the target language code (labels end with it).
        labels_head = [list(x) for x in train_ds.select(range(min(len(train_ds), 50)))["labels"]]
        tgt_lang = language_code_id(tokenizer, labels_head)
        if tgt_lang is not None:
            model.generation_config.decoder_start_token_id = tgt_lang

    prior = TokenMeter()
    if resume_from is not None and (resume_from / METER_FILE).is_file():
        prior = TokenMeter.from_dict(json.loads((resume_from / METER_FILE).read_text()))
    args = training_arguments(store.local_dir, train, device, len(eval_ds) > 0, objective)
    noise_cb, complete_cb = _callbacks(train_collator, store, resume_step or 0)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=train_collator,
        processing_class=tokenizer,
        eval_collator=eval_collator,
        pad_id=tokenizer.pad_token_id,
        prior_meter=prior,
        compute_metrics=_sacrebleu_metrics(tokenizer) if objective == "supervised" else None,
        callbacks=[noise_cb, complete_cb, *(callbacks or [])],
    )
    complete_cb.trainer = trainer
    if resume_from is not None:
        log.info("resuming %s from %s (step %d)", plan["run_name"], resume_from, resume_step)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = trainer.train_seconds()
    run_meter, total = trainer.run_meter(), trainer.total_meter()

    history = trainer.state.log_history
    if len(eval_ds) and not any(
        h.get("step") == trainer.state.global_step and "eval_loss" in h for h in history
    ):
        trainer.evaluate()
        history = trainer.state.log_history
    if not is_main:
        return {}

    final_dir = store.local_dir / FINAL
    shutil.rmtree(final_dir, ignore_errors=True)
    trainer.save_model(str(final_dir))
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens_per_second = run_meter.tokens / seconds if seconds else None
    metrics: dict[str, Any] = {
        "train_loss": train_losses[-1] if train_losses else output.training_loss,
        "train_loss_avg": output.training_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": total.tokens,
        "input_tokens_seen": total.input_tokens,
        "label_tokens_seen": total.label_tokens,
        "tokens_per_second": tokens_per_second,
        "slots_per_second": run_meter.slots / seconds if seconds else None,
        "nonpad_fraction": total.nonpad_fraction,
        "train_seconds": seconds,
        "eval_seconds": trainer.eval_seconds,
        "steps_this_run": trainer.state.global_step - (resume_step or 0),
        "device": device["name"],
        "bf16": device["bf16"],
        "packed_train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
    }
    for key in ("eval_bleu", "eval_chrf"):
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[key.removeprefix("eval_")] = vals[-1]
    enc, dec = encoder_decoder_params(trainer.model)
    metrics["params"] = sum(p.numel() for p in trainer.model.parameters())
    if device["device"] == "cuda" and seconds:
        flops = train_flops(enc, dec, run_meter.input_tokens, run_meter.label_tokens)
        metrics["mfu"] = mfu(
            flops,
            seconds,
            peak_flops(device["name"], device["bf16"]),
            max(1, int(os.environ.get("WORLD_SIZE", "1"))),
        )
    else:
        metrics["mfu"] = None  # MFU needs a GPU peak to compare with

    curve = plot_loss_curve(
        history, store.local_dir / LOSS_CURVE, title=f"{plan['run_name']} ({objective})"
    )
    (store.local_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    last_ckpt = store.latest()
    result = {
        "global_step": trainer.state.global_step,
        "train_loss": metrics["train_loss"],
        "eval_loss": metrics["eval_loss"],
        "tokens_seen": total.tokens,
        "tokens_per_second": tokens_per_second,
        "nonpad_fraction": total.nonpad_fraction,
        "checkpoint_uri": (f"{store.uri}/{last_ckpt.name}" if last_ckpt else store.uri),
        "resumed_from_step": resume_step,
        "metrics": metrics,
        "run_name": plan["run_name"],
        "output_uri": store.uri,
        "final_model_uri": f"{store.uri}/{FINAL}",
        "final_model_dir": str(final_dir),
        "loss_curve_uri": f"{store.uri}/{LOSS_CURVE}",
        "loss_curve_path": str(curve),
        "log_history_path": str(store.local_dir / "log_history.json"),
        "message": (
            f"trained {plan['run_name']} to step {trainer.state.global_step}"
            + (f" (resumed from step {resume_step})" if resume_step else "")
        ),
    }
    # Final model first, its marker last; the stored result makes a re-run a no-op.
    (final_dir / COMPLETE).write_text(json.dumps({"files": _file_sizes(final_dir)}))
    store.publish(final_dir, FINAL)
    store.publish(curve, LOSS_CURVE)
    store.publish(store.local_dir / "log_history.json", "log_history.json")
    (store.local_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    store.publish(store.local_dir / RESULT_FILE, RESULT_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train.run SPEC.json RESULT.json` (one process per GPU under torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tasks.train.run SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    callbacks = []
    if spec.get("mlflow_run_id"):
        try:
            from tasks.tracking import runs as tracking

            callbacks.append(
                tracking.MlflowMetricsCallback(spec["mlflow_run_id"], spec["tracking_uri"])
            )
        except (ImportError, AttributeError):
            pass
    try:
        result = train_model(spec["plan"], spec["model"], spec["train"], callbacks)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        Path(argv[1]).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
