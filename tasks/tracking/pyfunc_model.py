"""The `mlflow.pyfunc` model: a saved Hugging Face seq2seq folder that generates text.

Logged as an MLflow 3 "model from code": MLflow copies this file into the model and runs it at
load time, so `mlflow.pyfunc.load_model("models:/<name>@champion")` needs the pinned packages
only, not this repository. Keep it self-contained (no `tasks.*` imports).

Input: a pandas DataFrame with a string column `text` (or a list of strings); for mBART an
optional column `src_lang` (a language code such as `en_XX`) per row.
Output: a DataFrame with one column `generated`, one row per input.
Params (optional, per call): `max_new_tokens`, `num_beams`, `batch_size`, `src_lang` (for rows
without one), `tgt_lang` (the language an mBART decoder starts from; denoising models
reconstruct their input, so it defaults to the source language there).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMN = "text"
LANG_COLUMN = "src_lang"
OUTPUT_COLUMN = "generated"
DEFAULTS = {"max_new_tokens": 32, "num_beams": 1, "batch_size": 16, "max_source_length": 512}


class Seq2SeqGenerator(PythonModel):
    """Generates text with `AutoModelForSeq2SeqLM` from the folder in `artifacts["model"]`."""

    def load_context(self, context) -> None:
        """Load the tokenizer and model once per process."""
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = context.artifacts["model"]
        config = {**DEFAULTS, **(context.model_config or {})}
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder)
        want_gpu = config.get("device", "auto") in ("auto", "gpu", "cuda")
        self.device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()

    def _decode(self, ids: list[int]) -> str:
        """Text without pad/eos/language codes, keeping sentinels (span-corruption output)."""
        if not hasattr(self, "_drop_ids"):
            keep = _sentinel_ids(self.tokenizer)
            self._drop_ids = set(self.tokenizer.all_special_ids) - keep
        return self.tokenizer.decode(
            [i for i in ids if i not in self._drop_ids], skip_special_tokens=False
        )

    # A DataFrame hint: MLflow validates against the logged signature, not the hint.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Generate one text per input row; returns a DataFrame with column `generated`."""
        texts, langs = _texts(model_input), _langs(model_input)
        opts = {**self.config, **{k: v for k, v in (params or {}).items() if v not in (None, "")}}
        out: list[str] = [""] * len(texts)
        # mBART encodes the source language into the input: one pass per language.
        row_langs = [row or opts.get("src_lang") for row in langs]
        for lang in dict.fromkeys(row_langs):
            rows = [i for i, row in enumerate(row_langs) if row == lang]
            generated = self._generate([texts[i] for i in rows], lang, opts)
            for i, text in zip(rows, generated, strict=True):
                out[i] = text
        return pd.DataFrame({OUTPUT_COLUMN: [t.strip() for t in out]})

    def _generate(self, texts: list[str], lang: str | None, opts: dict[str, Any]) -> list[str]:
        import torch

        kwargs = {
            "max_new_tokens": int(opts["max_new_tokens"]),
            "num_beams": int(opts["num_beams"]),
        }
        if lang and hasattr(self.tokenizer, "src_lang"):
            self.tokenizer.src_lang = lang  # inputs end with `</s> <lang>`
        target = opts.get("tgt_lang") or (lang if opts.get("objective") == "denoising" else None)
        if target and hasattr(self.tokenizer, "src_lang"):
            kwargs["decoder_start_token_id"] = self.tokenizer.convert_tokens_to_ids(target)
        batch_size = max(1, int(opts["batch_size"]))
        out: list[str] = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=int(opts["max_source_length"]),
            ).to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(**batch, **kwargs)
            out.extend(self._decode(row) for row in ids.tolist())
        return out


def _sentinel_ids(tokenizer) -> set[int]:
    """Ids of T5 sentinels (<extra_id_N>): kept in the output so span fills stay readable."""
    return {i for t, i in tokenizer.get_vocab().items() if t.startswith("<extra_id_")}


def _langs(model_input: Any) -> list[str | None]:
    """The per-row source language (column `src_lang`), None where a row has none."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    n = len(_texts(model_input))
    if not isinstance(model_input, pd.DataFrame) or LANG_COLUMN not in model_input.columns:
        return [None] * n
    return [str(v) if isinstance(v, str) and v else None for v in model_input[LANG_COLUMN]]


def _texts(model_input: Any) -> list[str]:
    """The input texts from a DataFrame column `text`, a dict or a list of strings."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            column = model_input[INPUT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"expected a column {INPUT_COLUMN!r}; got columns {list(model_input.columns)}"
            )
        return ["" if v is None else str(v) for v in column.tolist()]
    if isinstance(model_input, dict):
        return _texts(pd.DataFrame(model_input))
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


# What MLflow loads when it runs this file as the model's code.
mlflow.models.set_model(Seq2SeqGenerator())
