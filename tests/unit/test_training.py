"""Training without training: silver lookup, eval split, objective checks, checkpoints, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.params import LakehouseParams, ModelParams, SourceParams, TrainParams
from tasks.train.checkpoints import COMPLETE, CheckpointStore, verify_checkpoint
from tasks.train.data import TrainingError, eval_bucket, tokenizer_fingerprint
from tasks.train.metrics import TokenMeter, mfu, peak_flops, plot_loss_curve, train_flops
from tasks.train.objectives import (
    PAIR_LENGTH_BASE,
    Lengths,
    check_objective,
    objective_lengths,
    pair_batch_order,
)
from tasks.train.plan import build_train_plan
from tests.fixtures.training import sample_pairs, sample_texts, write_silver

MODEL = {"max_source_length": 64, "max_target_length": 32, "revision": None}
TRAIN = {
    "objective": "span_corruption",
    "noise_density": 0.15,
    "mean_noise_span_length": 3.0,
    "max_steps": 10,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "seed": 1,
    "eval_fraction": 0.1,
    "mask_ratio": 0.35,
    "poisson_lambda": 3.5,
    "output_dir": None,
}


def _plan(root, model_dir, **train):
    return build_train_plan(
        lakehouse=LakehouseParams(root=root),
        source=SourceParams(dataset="json", language="multi"),
        model=ModelParams(**MODEL, name_or_path=str(model_dir)),
        train=TrainParams(**{**TRAIN, **train}),
    )


def test_plan_finds_committed_silver_and_names_run_stably(tmp_path, tiny_models):
    root = str(tmp_path / "lake")
    info = write_silver(root, tiny_models["t5"], sample_texts(per_language=20))
    # A crashed silver attempt: a batch folder without manifest must be ignored.
    junk = Path(root) / info["table"] / "batch=crashed"
    junk.mkdir(parents=True)
    (junk / "part-00000.parquet").write_bytes(b"not parquet")
    plan = _plan(root, tiny_models["t5"])
    assert sorted(plan.batch_ids) == sorted(info["batch_ids"])
    assert plan.rows == 60
    assert plan.lengths.input_length == 64
    assert plan.output_uri.startswith(str(Path(root).resolve() / "models"))
    assert _plan(root, tiny_models["t5"]).run_name == plan.run_name
    assert _plan(root, tiny_models["t5"], learning_rate=2e-3).run_name != plan.run_name
    # The process count is not part of the run's identity (a run resumes with another count).
    assert _plan(root, tiny_models["t5"], processes=2).run_name == plan.run_name


def test_empty_silver_is_a_clear_error(tmp_path, tiny_models):
    with pytest.raises(TrainingError, match="silver is empty.*python -m flows silver"):
        _plan(str(tmp_path / "lake"), tiny_models["t5"])


def test_silver_of_another_tokenizer_is_named(tmp_path, tiny_models):
    root = str(tmp_path / "lake")
    write_silver(
        root, tiny_models["mbart"], sample_texts(per_language=10), tokenizer_name="tiny-mbart"
    )
    with pytest.raises(
        TrainingError,
        match=r"built with tokenizer tiny-mbart-\w+ \(tiny-mbart\)"
        r".*run silver with model.name_or_path=",
    ):
        _plan(root, tiny_models["t5"])


def test_objective_that_does_not_fit_model_or_data(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    t5 = AutoTokenizer.from_pretrained(tiny_models["t5"])
    mbart = AutoTokenizer.from_pretrained(tiny_models["mbart"])
    with pytest.raises(TrainingError, match="sentinel"):
        check_objective("span_corruption", mbart, set(), "m", 64, 0.15, 3.0)
    with pytest.raises(TrainingError, match="<mask>"):
        check_objective("denoising", t5, set(), "m", 64, 0.15, 3.0)
    with pytest.raises(TrainingError, match="no `labels` column"):
        check_objective("supervised", t5, {"_row_id", "input_ids"}, "m", 64, 0.15, 3.0)
    root = str(tmp_path / "lake")
    write_silver(root, tiny_models["t5"], sample_texts(per_language=10))
    with pytest.raises(TrainingError, match="no `labels` column"):
        _plan(root, tiny_models["t5"], objective="supervised")
    pairs_root = str(tmp_path / "pairs")
    write_silver(pairs_root, tiny_models["t5"], sample_pairs(40))
    assert "labels" in _plan(pairs_root, tiny_models["t5"], objective="supervised").columns


def test_lengths_too_small_for_the_objective():
    assert objective_lengths("span_corruption", 128, 29) == Lengths(
        chunk_length=141,
        input_length=128,
        target_length=29,
    )
    with pytest.raises(TrainingError, match="lengths too small.*max_target_length>=29"):
        objective_lengths("span_corruption", 128, 20)
    with pytest.raises(TrainingError, match="lengths too small"):
        objective_lengths("denoising", 8, 8)
    with pytest.raises(TrainingError, match="max_target_length=32 must be >="):
        objective_lengths("denoising", 64, 32)


def test_eval_split_is_stable_by_row_id():
    import datasets

    from tasks.train.data import split_by_row_id

    ids = [f"row-{i}" for i in range(2000)]
    ds = datasets.Dataset.from_dict({"_row_id": ids, "input_ids": [[1]] * len(ids)})
    _, ev = split_by_row_id(ds, 0.1, None)
    more = datasets.Dataset.from_dict(
        {"_row_id": ids[::-1] + [f"new-{i}" for i in range(500)], "input_ids": [[1]] * 2500}
    )
    _, ev2 = split_by_row_id(more, 0.1, None)
    old_eval = set(ev["_row_id"])
    assert 150 < len(old_eval) < 250
    assert old_eval == {r for r in ev2["_row_id"] if r.startswith("row-")}
    assert all(eval_bucket(r) < 0.1 for r in old_eval)


def test_fingerprint_ignores_truncation_state(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["t5"])
    before = tokenizer_fingerprint(tok)
    tok(["some text here"], truncation=True, max_length=4)
    assert tokenizer_fingerprint(tok) == before
    other = AutoTokenizer.from_pretrained(tiny_models["mbart"])
    assert tokenizer_fingerprint(other) != before


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        CheckpointStore(folder.parent).mark_complete(folder)
    return folder


def test_latest_checkpoint_skips_half_written_and_corrupt(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint-10", 10)
    _checkpoint(run / "checkpoint-20", 20)
    _checkpoint(run / "checkpoint-30", 30, complete=False)  # killed while saving
    corrupt = _checkpoint(run / "checkpoint-25", 25)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 7)  # torn after the marker
    store = CheckpointStore(run)
    assert store.steps() == [25, 20, 10]
    assert verify_checkpoint(run / "checkpoint-30") == "no _COMPLETE marker (half-written)"
    assert "model.safetensors" in verify_checkpoint(corrupt, 25)
    assert store.latest() == run / "checkpoint-20"
    store.clean_after(20)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-20"]


def test_checkpoint_marker_is_written_after_remote_upload(tmp_path):
    from tasks.lakehouse.storage import open_lakehouse

    lake = open_lakehouse(str(tmp_path / "lake"))
    local = tmp_path / "work" / "run"
    folder = _checkpoint(local / "checkpoint-5", 5, complete=False)
    store = CheckpointStore(local, lake, "models/run")
    store.mark_complete(folder)
    assert lake.exists(f"models/run/checkpoint-5/{COMPLETE}")
    assert lake.exists("models/run/checkpoint-5/optimizer.pt")
    # Another machine: nothing local, the remote checkpoint is downloaded and verified.
    other = CheckpointStore(tmp_path / "elsewhere", lake, "models/run")
    assert other.latest() == tmp_path / "elsewhere" / "checkpoint-5"


def test_throughput_and_mfu_arithmetic(tmp_path):
    import torch

    meter = TokenMeter()
    meter.add(
        {
            "input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]),
            "labels": torch.tensor([[1, -100], [2, 3]]),
        },
        pad_id=0,
    )
    assert (meter.tokens, meter.slots) == (6, 10)
    assert meter.nonpad_fraction == pytest.approx(0.6)
    assert TokenMeter.from_dict(meter.to_dict()).merged(meter).tokens == 12
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert peak_flops("cpu", bf16=False) is None
    flops = train_flops(1_000_000, 2_000_000, 1000, 500)
    assert flops == 6.0 * (1e9 + 1e9)
    assert mfu(flops, 1.0, 1.2e10) == pytest.approx(1.0)
    assert mfu(flops, 1.0, None) is None
    png = plot_loss_curve(
        [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}],
        tmp_path / "c.png",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fill(order: list[int], src: list[int], tgt: list[int], batch: int) -> float:
    """Share of input + label slots holding tokens when batches pad each side separately."""
    useful = slots = 0
    for i in range(0, len(order), batch):
        b = order[i : i + batch]
        useful += sum(src[j] + tgt[j] for j in b)
        slots += len(b) * (max(src[j] for j in b) + max(tgt[j] for j in b))
    return useful / slots


def test_pair_batches_group_both_lengths_in_random_batch_order():
    import random

    import torch

    rng = random.Random(0)
    src = [rng.randint(3, 60) for _ in range(1000)]
    tgt = [max(2, s + rng.randint(-8, 8)) for s in src]  # correlated, as translations are
    lengths = [t * PAIR_LENGTH_BASE + s for s, t in zip(src, tgt, strict=True)]
    order = pair_batch_order(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(1000))  # every pair once
    grouped = _fill(order, src, tgt, 8)
    shuffled = _fill(rng.sample(range(1000), 1000), src, tgt, 8)
    by_label = sorted(range(1000), key=lambda j: (tgt[j], src[j]))
    assert grouped > 0.9 and grouped > _fill(by_label, src, tgt, 8) > shuffled
    # The largest batch comes first; the rest are not in length order.
    firsts = [src[order[i]] + tgt[order[i]] for i in range(0, 1000, 8)]
    sizes = [
        max(src[j] for j in order[i : i + 8]) + max(tgt[j] for j in order[i : i + 8])
        for i in range(0, 1000, 8)
    ]
    assert sizes[0] == max(sizes)
    assert firsts[1:] != sorted(firsts[1:]) and firsts[1:] != sorted(firsts[1:], reverse=True)
    # Seeded: the same generator state gives the same order, another one a new order.
    assert order == pair_batch_order(lengths, 8, torch.Generator().manual_seed(1))
    assert order != pair_batch_order(lengths, 8, torch.Generator().manual_seed(2))


def test_precision_follows_what_the_cpu_does_natively():
    import torch

    from tasks.train.model import cpu_has_bf16, resolve_device

    if torch.cuda.is_available():
        pytest.skip("CPU path only")
    assert resolve_device("cpu", "fp32", 512)["bf16"] is False
    assert resolve_device("cpu", "auto", 512)["bf16"] is cpu_has_bf16()
    assert resolve_device("cpu", "auto", 64)["bf16"] is False  # too narrow to gain from it
    if cpu_has_bf16():
        assert resolve_device("auto", "bf16") == {
            "device": "cpu",
            "gpus": 0,
            "name": "cpu",
            "bf16": True,
        }
    else:
        with pytest.raises(TrainingError, match="train.precision=bf16.*AMX"):
            resolve_device("cpu", "bf16")
    with pytest.raises(TrainingError, match="train.device=gpu"):
        resolve_device("gpu", "auto")


def test_language_codes_of_multilingual_tokenizers(tiny_models):
    from tasks.silver.tokenize import language_codes, load_tokenizer

    mbart = load_tokenizer(str(tiny_models["mbart"]))
    assert language_codes(mbart, "fr") == ("fr_XX", None)
    assert language_codes(mbart, "en-fr") == ("en_XX", "fr_XX")
    assert language_codes(mbart, "de") == ("de_DE", None)
    assert language_codes(mbart, "multi") == (None, None)  # no code: the defaults stay
    assert language_codes(mbart, None) == (None, None)
    assert language_codes(load_tokenizer(str(tiny_models["t5"])), "fr") == (None, None)
    coded = load_tokenizer(str(tiny_models["mbart"]), None, "fr_XX")
    assert coded.convert_ids_to_tokens(coded("Bonjour")["input_ids"][-1:]) == ["fr_XX"]
    assert mbart.src_lang == "en_XX"  # the cached default tokenizer is not changed


def test_a_failed_launch_names_the_rank_and_keeps_user_errors_plain():
    """torchrun's root-cause summary -> the error the flow run fails with."""
    import collections

    from tasks.train.launch import RankFailedError, failure

    summary = [
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : -9 (pid: 4242)",
        "  traceback : Signal 9 (SIGKILL) received by PID 4242",
    ]
    tails = collections.defaultdict(collections.deque)
    tails[1].extend(["INFO tasks.train.run: training", "INFO step 3"])
    err = failure(1, ["[rank 0] ok", *summary], tails)
    assert isinstance(err, RankFailedError)
    assert str(err).startswith("training rank 1 failed (killed by SIGKILL); its last output:")
    assert "INFO step 3" in str(err) and "memory runs out" in str(err)
    # A rank's own TrainingError (exit 2, `error: ...`) stays the user's message.
    tails[1].append("error: invalid training settings (train.* / train.extra_args): bad")
    summary[3] = "  exitcode  : 2 (pid: 4242)"
    err = failure(1, summary, tails)
    assert isinstance(err, TrainingError) and str(err).startswith("invalid training settings")
    # torchrun itself killed: no summary, still a clear error.
    assert "torchrun exited with code -9" in str(failure(-9, ["Killed"], {}))
