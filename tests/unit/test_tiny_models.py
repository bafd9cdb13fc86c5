"""Tests for tasks.train.tiny_models: tiny T5/mBART folders that load like hub checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from tasks.train.tiny_models import MARKER, build_tiny_models  # noqa: E402

TEXTS = [
    "Ceci est une phrase française assez ordinaire.",
    "This is an ordinary English sentence.",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Builds the tiny models once for the module."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny"), vocab_size=1000)


def _loss(path: Path, src_lang: str | None = None) -> float:
    """Runs one forward pass with labels and returns the loss."""
    tok = AutoTokenizer.from_pretrained(path)
    if src_lang:
        tok.src_lang = src_lang
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    batch = tok(TEXTS, text_target=TEXTS[::-1], padding=True, return_tensors="pt")
    batch["labels"][batch["labels"] == tok.pad_token_id] = -100
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("name", ["t5", "mbart"])
def test_folders_load_as_fast_tokenizer_and_model(built: dict[str, Path], name: str) -> None:
    """Both folders load through the Auto classes with a fast tokenizer sized like the model."""
    tok = AutoTokenizer.from_pretrained(built[name])
    model = AutoModelForSeq2SeqLM.from_pretrained(built[name])
    assert tok.is_fast
    assert len(tok) == model.config.vocab_size
    ids = tok(TEXTS[0])["input_ids"]
    assert ids and tok.unk_token_id not in ids
    assert ids[-1] != tok.pad_token_id


def test_t5_special_tokens_follow_t5_layout(built: dict[str, Path]) -> None:
    """T5: pad=0, eos=1, unk=2, sentinels at the end with <extra_id_0> the largest id."""
    tok = AutoTokenizer.from_pretrained(built["t5"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    n = len(tok)
    ids = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ids == [n - 1 - i for i in range(100)]
    assert tok(TEXTS[0])["input_ids"][-1] == tok.eos_token_id
    # Sentinels are atomic special tokens inside text.
    assert tok.convert_tokens_to_ids("<extra_id_0>") in tok("a <extra_id_0> b")["input_ids"]
    # NFKC survives save/load: full-width letters and ligatures map to plain ones.
    assert tok("Ｆｉｌｅ ﬁle")["input_ids"] == tok("File file")["input_ids"]


def test_mbart_language_codes(built: dict[str, Path]) -> None:
    """mBART: fairseq layout, and src_lang appends `</s> <lang>` as mBART does."""
    tok = AutoTokenizer.from_pretrained(built["mbart"])
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1
    for code in ["en_XX", "fr_XX", "de_DE", "es_XX", "it_IT", "pt_XX", "nl_XX"]:
        tok.src_lang = code
        ids = tok(TEXTS[0])["input_ids"]
        assert ids[-2:] == [tok.eos_token_id, tok.convert_tokens_to_ids(code)]
        assert tok.convert_tokens_to_ids(code) != tok.unk_token_id


@pytest.mark.parametrize(("name", "lang"), [("t5", None), ("mbart", "fr_XX")])
def test_forward_pass_has_finite_loss(built: dict[str, Path], name: str, lang: str | None) -> None:
    """A forward pass with labels gives a finite loss near ln(vocab) for a random model."""
    loss = _loss(built[name], lang)
    assert math.isfinite(loss)
    assert loss < 3 * math.log(AutoTokenizer.from_pretrained(built[name]).vocab_size)


def test_rebuild_is_idempotent(built: dict[str, Path]) -> None:
    """A second build with the same inputs reuses the folders untouched."""
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in built.items()}
    again = build_tiny_models(built["t5"].parent, vocab_size=1000)
    assert again == built
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in again.items()} == before
    assert not [p for p in built["t5"].parent.iterdir() if p.name.startswith(".tiny-build-")]


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    """A folder without the completion marker (a crashed build) is replaced."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{t} {i}" for i in range(50) for t in TEXTS), encoding="utf-8")
    (tmp_path / "out" / "tiny-t5").mkdir(parents=True)
    (tmp_path / "out" / "tiny-t5" / "junk").write_text("partial")
    paths = build_tiny_models(tmp_path / "out", [corpus], vocab_size=150)
    assert not (paths["t5"] / "junk").exists()
    assert json.loads((paths["t5"] / MARKER).read_text())["vocab_size"] == 150
    assert AutoTokenizer.from_pretrained(paths["t5"]).is_fast


def test_missing_corpus_file_is_a_clear_error(tmp_path: Path) -> None:
    """A missing corpus file is named in the error."""
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_tiny_models(tmp_path, [tmp_path / "nope.jsonl"])
