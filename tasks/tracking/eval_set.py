"""The held-out rows a model is judged on: the eval split of the silver version a run pinned.

A comparison between two models says something only when both are scored on the same rows by
the same code. These are the rows training held out (by hash of `_row_id`, with the run's
`train.eval_fraction` and `train.max_eval_samples`), read from the candidate's pinned silver
version and turned into model inputs as training's evaluation does: the same packing or pair
truncation, and the eval collator's fixed noise. Base model, candidate and champion are all
scored on this one set, and its identity (table, version, row count, hash of the row ids) is
recorded with every number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.lakehouse.storage import open_lakehouse
from tasks.params import ModelParams, TrainParams
from tasks.tracking.lineage import EvalSetIdentity, eval_set_identity
from tasks.train.data import PAIR_COLUMNS, TRAIN_COLUMNS, read_silver, split_by_row_id
from tasks.train.model import load_tokenizer
from tasks.train.objectives import build_collators, build_datasets, language_code_id
from tasks.train.plan import TrainPlan, work_dir


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Held-out examples ready for a model, and how to generate from them.

    Attributes:
        identity: which rows these are (recorded with every score).
        objective: the training objective the examples were made for.
        examples: a `datasets.Dataset` of packed chunks (span corruption, denoising) or
            truncated pairs (supervised), in a fixed order.
        collator: training's eval collator (fixed noise: `set_epoch(0)` before each pass).
        tokenizer: the models' shared tokenizer.
        batch_size: rows per forward pass (training's batch size).
        max_length: longest generation, decoder start included.
        num_beams: beams when generating (training's `train.num_beams`).
        decoder_start_id: the language code an mBART decoder starts from, else None.
        lang_code: that code as text (`en_XX`), for the pyfunc model's `src_lang`.
        mask_ratio, mean_span: the denoising noise, for the span-restoration metric.
    """

    identity: EvalSetIdentity
    objective: str
    examples: Any
    collator: Callable
    tokenizer: Any
    batch_size: int
    max_length: int
    num_beams: int
    decoder_start_id: int | None
    lang_code: str | None
    mask_ratio: float
    mean_span: float

    def __len__(self) -> int:
        return len(self.examples)


def load_eval_set(*, plan: TrainPlan, model: ModelParams, train: TrainParams) -> EvalSet:
    """The held-out rows of `plan`'s pinned silver version, as model inputs."""
    tokenizer = load_tokenizer(model.name_or_path, model.revision)
    supervised = train.objective == "supervised"
    columns = TRAIN_COLUMNS + (PAIR_COLUMNS if supervised else [])
    lake = open_lakehouse(plan.root, plan.block)
    # The same read, split and mapping as training (tasks/train/run.py): datasets' cache
    # serves the mapped rows training already made.
    silver = read_silver(lake, plan.silver, columns, work_dir() / "datasets")
    _, held_out = split_by_row_id(silver, train.eval_fraction, train.max_eval_samples)
    identity = eval_set_identity(plan.silver.uri, plan.silver.version, list(held_out["_row_id"]))
    head = [list(x) for x in silver.select(range(min(len(silver), 200)))["input_ids"]]
    lang_id = language_code_id(tokenizer, head) if train.objective != "span_corruption" else None
    _, examples = build_datasets(
        silver,
        objective=train.objective,
        tokenizer=tokenizer,
        lengths=plan.lengths,
        eval_fraction=train.eval_fraction,
        max_eval_samples=train.max_eval_samples,
        drop_ids=[lang_id] if lang_id is not None else [],
    )
    _, collator = build_collators(
        tokenizer=tokenizer, lengths=plan.lengths, train=train, lang_id=lang_id
    )
    decoder_start = lang_id
    if supervised and lang_id is not None and len(examples):
        # mBART pairs: the decoder starts from the target language code (labels end with it).
        labels_head = [list(x) for x in examples.select(range(min(len(examples), 50)))["labels"]]
        decoder_start = language_code_id(tokenizer, labels_head)
    max_length = train.generation_max_length if supervised else plan.lengths.target_length + 1
    return EvalSet(
        identity=identity,
        objective=train.objective,
        examples=examples,
        collator=collator,
        tokenizer=tokenizer,
        batch_size=train.batch_size,
        max_length=max_length,
        num_beams=train.num_beams,
        decoder_start_id=decoder_start,
        lang_code=tokenizer.convert_ids_to_tokens(lang_id) if lang_id is not None else None,
        mask_ratio=train.mask_ratio,
        mean_span=train.poisson_lambda,
    )
