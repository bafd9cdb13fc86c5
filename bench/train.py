"""Training throughput: our packed, length-grouped pipeline against a naive Seq2SeqTrainer.

Both sides train the same model on the same committed silver for the same number of steps, in
one process, one after the other. The baseline is what a first attempt looks like: one example
per document (or pair), noise applied once up front, `DataCollatorForSeq2Seq` padding to max
length, random batches. Both run in the same Seq2SeqTrainer subclass, which only counts tokens.
Useful tokens are the non-padding input and label tokens (`tasks.train.packing.count_tokens`) of
the steps after the warm-up, divided by those steps' wall time.

The model is by default "small" (the tiny test models widened to 4+4 layers and d_model 256,
random weights): on the 2-layer, d_model-64 test models a CPU step is mostly Python overhead,
which says little about training a real model. `--model tiny` measures those anyway.

Data parallel: the same span-corruption run through `tasks.train.launch` (torchrun, gloo on CPU)
as 1 process x T threads and as 2 processes x T/2 threads (the same global batch and total
threads), useful tokens/s of the steps after the warm-up from the runs' own logs (token counts
summed over ranks), with OpenMP threads waiting passively unless OMP_WAIT_POLICY says otherwise.
On a CPU both should be about equal: the point is that the data-parallel machinery costs
nothing; the gain comes with several GPUs.

Usage: python -m bench.train [--steps N] [--objectives a,b] [--batch-size B] [--model M]
[--no-data-parallel] [--threads T]
Prints `name: value` lines and `ratio_*` lines; on a GPU also MFU for mt5-small- and
t5-base-sized models (random weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

from tasks.train.metrics import TokenMeter  # noqa: E402

LENGTHS = {"span_corruption": (128, 29), "denoising": (128, 128), "supervised": (96, 96)}
FAMILY = {"span_corruption": "t5", "denoising": "mbart", "supervised": "t5"}
GOALS = {"span_corruption": 0.98, "denoising": 0.98, "supervised": 0.9}


WARMUP = 3  # steps left out of the rates (allocator, threads and caches warming up)
# "small": the tiny models widened to a size where the model's arithmetic, not Python, takes
# most of a CPU step (as for any real model); random weights, the same tokenizers.
SMALL = {
    "t5": {
        "d_model": 256,
        "d_ff": 1024,
        "d_kv": 64,
        "num_heads": 4,
        "num_layers": 4,
        "num_decoder_layers": 4,
    },
    "mbart": {
        "d_model": 256,
        "encoder_ffn_dim": 1024,
        "decoder_ffn_dim": 1024,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_layers": 4,
        "decoder_layers": 4,
    },
}


def widen(model_dir: Path, family: str, out: Path) -> Path:
    """A model folder with the tiny model's tokenizer and a wider, randomly initialised body."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

    set_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in SMALL[family].items():
        setattr(config, key, value)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


class SteadyClock(TrainerCallback):
    """Measures a trainer's token meter and wall time from step WARMUP to the end."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.start: tuple[float, TokenMeter] | None = None
        self.end: tuple[float, TokenMeter] | None = None

    def _now(self) -> tuple[float, TokenMeter]:
        return time.perf_counter(), TokenMeter.from_dict(self.trainer.meter.to_dict())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP:
            self.start = self._now()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = self._now()

    def rate(self) -> tuple[TokenMeter, float]:
        """(tokens and slots of the measured steps, their seconds)."""
        (t0, m0), (t1, m1) = self.start, self.end
        diff = {k: getattr(m1, k) - getattr(m0, k) for k in TokenMeter.__dataclass_fields__}
        return TokenMeter(**diff), t1 - t0


def steady_clock(trainer) -> SteadyClock:
    clock = SteadyClock(trainer)
    trainer.add_callback(clock)
    return clock


def _args(out: Path, steps: int, batch: int, **kw):
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=not _cuda(),
        seed=0,
        remove_unused_columns=False,
        **{"bf16": _cuda() and _bf16(), **kw},
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def baseline_dataset(objective, silver, tokenizer, lengths, collators):
    """One example per document/pair, static noise, no packing (what the baseline trains on)."""
    from tasks.train.noise import SpanCorruptionCollator, compute_t5_input_and_target_lengths

    src_len = lengths.input_length
    rows = []
    if objective == "supervised":
        for ex in silver:
            rows.append(
                {
                    "input_ids": list(ex["input_ids"])[:src_len],
                    "labels": list(ex["labels"])[: lengths.target_length],
                }
            )
        return rows
    noiser = collators[1]  # a separate seeded instance: noise drawn once, up front
    chunk = lengths.chunk_length
    for ex in silver:
        lang = getattr(noiser, "lang_id", None)
        doc = [t for t in ex["input_ids"] if t != lang][:chunk]
        if objective == "span_corruption":
            if len(doc) < 16:
                continue
            # The naive way: corrupt each document at its own length (no packing).
            inp = 4
            while compute_t5_input_and_target_lengths(inp + 1)[0] <= len(doc):
                inp += 1
            raw, tgt = compute_t5_input_and_target_lengths(inp)
            try:
                col = SpanCorruptionCollator(
                    noiser.sentinel_ids.tolist(),
                    noiser.eos_id,
                    noiser.pad_id,
                    inp,
                    tgt,
                    seed=len(rows),
                )
                b = col([{"input_ids": doc[:raw]}])
            except (AssertionError, ValueError):
                continue  # degenerate length for span corruption
        else:
            b = noiser([{"input_ids": doc}])
        rows.append(
            {
                "input_ids": b["input_ids"][0][
                    b["input_ids"][0] != tokenizer.pad_token_id
                ].tolist(),
                "labels": [t for t in b["labels"][0].tolist() if t != -100],
            }
        )
    return rows


def sections(objective: str, model_dir: str, steps: int, batch: int, **train):
    """The model and train parameter sections of a benchmark run."""
    from tasks.params import ModelParams, TrainParams

    src_len, tgt_len = LENGTHS[objective]
    model = ModelParams(
        name_or_path=model_dir, max_source_length=src_len, max_target_length=tgt_len
    )
    device = "cpu" if not _cuda() else "auto"
    return model, TrainParams(
        objective=objective, max_steps=steps, batch_size=batch, device=device, **train
    )


def _plan(root: str, model, train):
    from tasks.params import LakehouseParams, SourceParams
    from tasks.train.plan import build_train_plan

    return build_train_plan(
        lakehouse=LakehouseParams(root=root),
        source=SourceParams(dataset="json", language="multi"),
        model=model,
        train=train,
    )


def steady_rate(log_history: list[dict]) -> float:
    """Useful tokens/s between step WARMUP and the last step, from a run's per-step logs."""
    steps = {h["step"]: h for h in log_history if "tokens_seen" in h and "train_seconds" in h}
    first, last = steps[WARMUP], steps[max(steps)]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    return tokens / (last["train_seconds"] - first["train_seconds"])


def data_parallel(root: str, model_dir: str, steps: int, batch: int, threads: int) -> dict:
    """Span corruption on 1 process x `threads` and 2 processes x threads/2 (same global batch)."""
    import json

    from tasks.train.launch import LaunchSpec, launch_ranks

    # Idle OpenMP threads spin by default; on a machine that other work also loads, the spinning
    # made the 2-thread process 10-20x slower here, which measures the load, not the machinery.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rates = {}
    for processes in (1, 2):
        out_dir = Path(root) / f"dp-{processes}"
        model, train = sections(
            "span_corruption",
            model_dir,
            steps,
            batch,
            processes=processes,
            logging_steps=1,
            save_steps=steps,
            eval_steps=steps * 10,
            resume="never",
            output_dir=str(out_dir),
        )
        outcome = launch_ranks(
            LaunchSpec(plan=_plan(root, model, train), model=model, train=train),
            processes=processes,
            folder=Path(root) / f"launch-{processes}",
            on_line=lambda line: None,
            threads=max(1, threads // processes),
        )
        history = json.loads(Path(outcome.log_history_path).read_text())
        rates[processes] = steady_rate(history)
    return rates


def run_objective(objective: str, root: str, models: dict, steps: int, batch: int) -> dict:
    """Train ours and the baseline on the same silver; returns both meters and times."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from tasks.lakehouse.storage import open_lakehouse
    from tasks.train.data import PAIR_COLUMNS, TRAIN_COLUMNS, read_silver
    from tasks.train.model import load_model, model_width, resolve_device
    from tasks.train.objectives import build_collators, build_datasets, language_code_id
    from tasks.train.trainer import LakehouseTrainer

    model_dir = str(models[FAMILY[objective]])
    mp, tp = sections(objective, model_dir, steps, batch)
    plan = _plan(root, mp, tp)
    lake = open_lakehouse(root)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cols = TRAIN_COLUMNS + (PAIR_COLUMNS if objective == "supervised" else [])
    silver = read_silver(lake, plan.silver, cols, Path(tempfile.mkdtemp()) / "ds")
    head = [list(x) for x in silver.select(range(min(200, len(silver))))["input_ids"]]
    lang = language_code_id(tok, head) if objective != "span_corruption" else None
    train_ds, _ = build_datasets(
        silver,
        objective=objective,
        tokenizer=tok,
        lengths=plan.lengths,
        eval_fraction=tp.eval_fraction,
        max_eval_samples=tp.max_eval_samples,
        drop_ids=[lang] if lang is not None else [],
    )
    collators = build_collators(tokenizer=tok, lengths=plan.lengths, train=tp, lang_id=lang)
    src_len, tgt_len = LENGTHS[objective]
    out = {}
    trainer_class = LakehouseTrainer  # Seq2SeqTrainer + the token meter, for both sides
    with tempfile.TemporaryDirectory() as tmp:
        # Baseline: DataCollatorForSeq2Seq padding to max length, no packing, random batches.
        import datasets

        base_rows = baseline_dataset(objective, silver, tok, plan.lengths, collators)
        base = trainer_class(
            model=load_model(model_dir),
            args=_args(Path(tmp) / "b", steps, batch),
            train_dataset=datasets.Dataset.from_list(base_rows),
            data_collator=DataCollatorForSeq2Seq(
                tok, padding="max_length", max_length=max(src_len, tgt_len)
            ),
            processing_class=tok,
            pad_id=tok.pad_token_id,
        )
        clock = steady_clock(base)
        base.train()
        out["baseline"] = clock.rate()

        extra = (
            {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
            if objective == "supervised"
            else {}
        )
        # Ours as `python -m flows train` runs it (train.precision=auto: bf16 autocast where the
        # hardware does bf16 and the model is wide enough), and in fp32: the pipeline alone.
        width = model_width(load_model(model_dir).config)
        bf16 = resolve_device(tp.device, "auto", width)["bf16"]
        for key, precision in (("ours", bf16), ("ours_fp32", False)):
            if key == "ours_fp32" and not bf16:
                out[key] = out["ours"]
                continue
            ours = trainer_class(
                model=load_model(model_dir),
                args=_args(Path(tmp) / "o", steps, batch, bf16=precision, **extra),
                train_dataset=train_ds,
                data_collator=collators[0],
                processing_class=tok,
                pad_id=tok.pad_token_id,
            )
            clock = steady_clock(ours)
            ours.train()
            out[key] = clock.rate()
        out["precision"] = "bf16" if bf16 else "fp32"
    return out


def mfu_report(steps: int) -> None:
    """MFU of our span-corruption pipeline on mt5-small- and t5-base-sized random models."""
    if not _cuda():
        print("mfu_mt5_small: n/a (no GPU)")
        print("mfu_t5_base: n/a (no GPU)")
        return
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from tasks.train.metrics import encoder_decoder_params, mfu, peak_flops, train_flops
    from tasks.train.noise import SpanCorruptionCollator, compute_t5_input_and_target_lengths

    configs = {
        "mt5_small": T5Config(
            vocab_size=250112,
            d_model=512,
            d_ff=1024,
            d_kv=64,
            num_layers=8,
            num_heads=6,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
        "t5_base": T5Config(
            vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12
        ),
    }
    name = torch.cuda.get_device_name(0)
    for key, cfg in configs.items():
        cfg.decoder_start_token_id = 0
        model = T5ForConditionalGeneration(cfg).cuda().to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        raw, tgt = compute_t5_input_and_target_lengths(512)
        col = SpanCorruptionCollator(
            list(range(cfg.vocab_size - 1, cfg.vocab_size - 101, -1)), 1, 0, 512, tgt
        )
        gen = torch.Generator().manual_seed(0)
        batch_size = 32
        enc, dec = encoder_decoder_params(model)
        tokens_in = tokens_out = 0
        seconds = 0.0
        for step in range(steps + 3):
            rows = [
                {"input_ids": torch.randint(5, 30000, (raw,), generator=gen).tolist()}
                for _ in range(batch_size)
            ]
            b = {k: v.cuda() for k, v in col(rows).items()}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 3:  # warm-up steps excluded
                seconds += time.perf_counter() - t0
                tokens_in += b["input_ids"].numel()
                tokens_out += b["labels"].numel()
        value = mfu(train_flops(enc, dec, tokens_in, tokens_out), seconds, peak_flops(name, True))
        print(
            f"mfu_{key}: {value:.3f} ({name}, bf16, batch {batch_size}x512)"
            if value is not None
            else f"mfu_{key}: n/a (unknown GPU {name})"
        )
        del model, opt
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--objectives",
        default="span_corruption,denoising,supervised",
        help='comma-separated; "" runs only the data-parallel comparison',
    )
    parser.add_argument(
        "--model",
        choices=("small", "tiny"),
        default="small",
        help="small: 4+4 layers, d_model 256 (default); tiny: the test models (2+2 layers, "
        "d_model 64), where Python overhead rather than the model takes most of a step",
    )
    parser.add_argument(
        "--data-parallel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare 1 process x T threads with 2 processes x T/2 threads (torchrun)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="total CPU threads of the data-parallel runs"
    )
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")

    from tasks.train.tiny_models import build_tiny_models
    from tests.fixtures.training import sample_pairs, sample_texts, write_silver

    models = build_tiny_models(ROOT / ".work" / "models")
    failed = False
    print(f"model: {args.model}, batch {args.batch_size}, {args.steps} steps ({WARMUP} warm-up)")
    with tempfile.TemporaryDirectory() as lake_dir:
        if args.model == "small":
            models = {f: widen(models[f], f, Path(lake_dir) / f"small-{f}") for f in SMALL}
        for objective in filter(None, args.objectives.split(",")):
            root = f"{lake_dir}/{objective}"
            rows = (
                sample_pairs(1200)
                if objective == "supervised"
                else sample_texts(("en", "fr", "de", "es"), 320)
            )
            write_silver(root, models[FAMILY[objective]], rows)
            res = run_objective(objective, root, models, args.steps, args.batch_size)
            (bm, bt), (om, ot) = res["baseline"], res["ours"]
            b_tps, o_tps = bm.tokens / bt, om.tokens / ot
            print(f"{objective}_baseline_useful_tokens_per_s: {b_tps:.1f}")
            print(f"{objective}_ours_useful_tokens_per_s: {o_tps:.1f}")
            print(f"{objective}_baseline_nonpad_fraction: {bm.nonpad_fraction:.3f}")
            print(f"{objective}_ours_nonpad_fraction: {om.nonpad_fraction:.3f}")
            ratio = o_tps / b_tps
            fm, ft = res["ours_fp32"]
            print(
                f"ratio_{objective}_useful_tokens_per_s: {ratio:.2f} (goal >= 1.3; ours in "
                f"{res['precision']}, train.precision=auto)"
            )
            print(
                f"ratio_{objective}_useful_tokens_per_s_both_fp32: {fm.tokens / ft / b_tps:.2f} "
                "(the data pipeline alone)"
            )
            ok = ratio >= 1.3 and om.nonpad_fraction >= GOALS[objective]
            print(
                f"goal_{objective}: {'met' if ok else 'NOT met'} "
                f"(nonpad goal >= {GOALS[objective]})"
            )
            failed |= not ok
        if args.data_parallel and not _cuda():
            root = f"{lake_dir}/data-parallel"
            write_silver(root, models["t5"], sample_texts(("en", "fr", "de", "es"), 320))
            rates = data_parallel(
                root, str(models["t5"]), args.steps, args.batch_size, args.threads
            )
            half = max(1, args.threads // 2)
            print(
                f"data_parallel_1x{args.threads}_useful_tokens_per_s: {rates[1]:.1f} "
                f"(span corruption, 1 process x {args.threads} threads)"
            )
            print(
                f"data_parallel_2x{half}_useful_tokens_per_s: {rates[2]:.1f} "
                f"(2 processes x {half} thread(s), gloo; the same global batch; "
                f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})"
            )
            print(
                f"ratio_data_parallel_2_vs_1_processes: {rates[2] / rates[1]:.2f} "
                "(expect about 1.0 on CPU: no loss from the data-parallel machinery)"
            )
    mfu_report(args.steps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
