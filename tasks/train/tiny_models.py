"""Build tiny, randomly initialised T5 and mBART models with tokenizers trained on the sample.

The demo and the tests need real Hugging Face folders (`from_pretrained` works on them, offline)
that train in seconds. Both tokenizers share one Unigram model trained with `tokenizers` on the
shipped sample; each is then laid out with its family's special-token convention:

- tiny-t5: `<pad>`=0, `</s>`=1, `<unk>`=2, learned pieces, then `<extra_id_99>`..`<extra_id_0>`
  at the end, so `<extra_id_0>` is the largest id (`len(tok) - 1 - i` for `<extra_id_i>`), as in
  T5/mT5. Inputs get `</s>` appended.
- tiny-mbart: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, learned pieces, the language codes, then
  `<mask>` last, as in mBART-cc25. Inputs end in `</s> <lang_code>` (set `tokenizer.src_lang`).

Normalisation is NFKC through the SentencePiece `nmt_nfkc` precompiled charsmap (what mT5 ships),
because transformers 5 rebuilds T5 tokenizers from the vocab on load and keeps only a
`Precompiled` normaliser; a plain `normalizers.NFKC` would silently vanish on reload.
transformers 5's `MBartTokenizer` always drops the normaliser on load (it does the same to
facebook/mbart-*), so tiny-mbart has none: its saved and loaded behaviour are the same.

Usage: `python -m tasks.train.tiny_models --out DIR [--corpus FILES...] [--vocab-size N]
[--seed S]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from tasks import REPO_ROOT

SAMPLE_DIR = REPO_ROOT / "data" / "sample"
MARKER = "tiny_model_build.json"
BUILD_VERSION = 1  # bump when the layout below changes, so old folders are rebuilt
T5_EXTRA_IDS = 100
# mBART-cc25 codes (the ones MBartTokenizer knows) plus pt_XX from mBART-50 for the sample's pt.
MBART_LANG_CODES = [
    "ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN",
    "it_IT", "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO",
    "ru_RU", "si_LK", "tr_TR", "vi_VN", "zh_CN", "pt_XX",
]  # fmt: skip
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
MBART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def default_corpus() -> list[Path]:
    """Returns the shipped sample files used when no corpus is given."""
    files = sorted((SAMPLE_DIR / "culturax").glob("*.jsonl"))
    files += sorted((SAMPLE_DIR / "pairs").glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"No sample corpus under {SAMPLE_DIR}; pass corpus files explicitly "
            "(--corpus FILE...) or rebuild it with `python data/sample/build_sample.py`."
        )
    return files


def iter_texts(files: list[Path]) -> Iterator[str]:
    """Yields training texts: `text`/`source`/`target` of JSON lines, or lines of plain text."""
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                if path.suffix == ".jsonl":
                    row = json.loads(line)
                    for key in ("text", "source", "target"):
                        if isinstance(row.get(key), str) and row[key]:
                            yield row[key]
                else:
                    yield line


def nfkc_charsmap() -> bytes:
    """Returns SentencePiece's `nmt_nfkc` precompiled charsmap (the normaliser mT5 uses)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    # The charsmap is compiled into SentencePiece; a throwaway model is the public way to get it.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 8),
        model_writer=buf,
        vocab_size=12,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def train_unigram(files: list[Path], vocab_size: int, charsmap: bytes) -> list[tuple[str, float]]:
    """Trains a Unigram model and returns its (piece, score) list, T5 specials first."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Precompiled(charsmap)
    # Same pre-tokenizer that T5Tokenizer/MBartTokenizer rebuild on load, so pieces match.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=T5_SPECIALS,
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    pieces = [(str(p), float(s)) for p, s in vocab]
    if [p for p, _ in pieces[: len(T5_SPECIALS)]] != T5_SPECIALS:
        raise RuntimeError(f"Unexpected special-token layout: {pieces[:3]}")
    return pieces


def build_t5(pieces: list[tuple[str, float]], charsmap: bytes, out: Path, seed: int) -> None:
    """Saves a tiny mT5-like tokenizer, config and random model into `out`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    # T5 puts the sentinels after the learned pieces, <extra_id_0> last (largest id).
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tokenizer = T5TokenizerFast(
        vocab=pieces + sentinels,
        extra_ids=T5_EXTRA_IDS,
        _spm_precompiled_charsmap=charsmap,
        model_max_length=512,
    )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # mT5 unties input and output embeddings
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # An untied T5 head is drawn with std 1, giving logits of std ~sqrt(d_model) and a first loss
    # near 30; scaling by d_model**-0.5 (what tied T5 does) starts training near ln(vocab).
    with torch.no_grad():
        model.lm_head.weight.mul_(config.d_model**-0.5)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


def build_mbart(pieces: list[tuple[str, float]], out: Path, seed: int) -> None:
    """Saves a tiny mBART-like tokenizer, config and random model into `out`."""
    import torch
    from transformers import MBartConfig, MBartForConditionalGeneration, MBartTokenizerFast

    learned = pieces[len(T5_SPECIALS) :]
    vocab = [(t, 0.0) for t in MBART_SPECIALS] + learned
    vocab += [(code, 0.0) for code in MBART_LANG_CODES] + [("<mask>", 0.0)]
    tokenizer = MBartTokenizerFast(
        vocab=vocab,
        additional_special_tokens=MBART_LANG_CODES,
        src_lang="en_XX",
        model_max_length=512,
    )
    config = MBartConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=512,
        scale_embedding=True,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = MBartForConditionalGeneration(config)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


def build_key(files: list[Path], vocab_size: int, seed: int) -> str:
    """Hashes everything that determines the build, so a changed input triggers a rebuild."""
    h = hashlib.sha256(f"v{BUILD_VERSION}|{vocab_size}|{seed}".encode())
    for path in files:
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def is_complete(folder: Path, key: str) -> bool:
    """Tells whether `folder` holds a finished build with this key."""
    try:
        return json.loads((folder / MARKER).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def build_tiny_models(
    out_dir: str | Path,
    corpus_files: list[Path] | None = None,
    vocab_size: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Builds (or reuses) `<out>/tiny-t5` and `<out>/tiny-mbart`; returns their paths."""
    # Fork-safety: the trainer's thread pool must not be live if a caller forks later.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(out_dir)
    files = [Path(f) for f in corpus_files] if corpus_files else default_corpus()
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Corpus file(s) not found: {', '.join(missing)}")
    if vocab_size < 100:
        raise ValueError(f"vocab_size must be at least 100, got {vocab_size}")
    key = build_key(files, vocab_size, seed)
    targets = {"t5": out_dir / "tiny-t5", "mbart": out_dir / "tiny-mbart"}
    if all(is_complete(p, key) for p in targets.values()):
        return targets

    out_dir.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so a crash never leaves a half-written model folder.
    staging = out_dir / f".tiny-build-{uuid.uuid4().hex}"
    try:
        charsmap = nfkc_charsmap()
        pieces = train_unigram(files, vocab_size, charsmap)
        build_t5(pieces, charsmap, staging / "tiny-t5", seed)
        build_mbart(pieces, staging / "tiny-mbart", seed)
        marker = {
            "key": key,
            "vocab_size": vocab_size,
            "seed": seed,
            "corpus": [str(f) for f in files],
        }
        for target in targets.values():
            built = staging / target.name
            (built / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # save_pretrained writes weights 0600; containers run as another user (uid 10001).
            for f in built.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
            built.chmod(0o755)
            if is_complete(target, key):
                continue  # a concurrent build finished first; its output is identical
            if target.exists():
                shutil.rmtree(target)
            os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints the built folders as JSON."""
    parser = argparse.ArgumentParser(description="Build tiny T5 and mBART models for the demo.")
    parser.add_argument("--out", required=True, type=Path, help="folder for tiny-t5/, tiny-mbart/")
    parser.add_argument(
        "--corpus", nargs="+", type=Path, help="JSONL or text files (default: sample)"
    )
    parser.add_argument("--vocab-size", type=int, default=2000, help="learned Unigram vocab size")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    args = parser.parse_args(argv)
    paths = build_tiny_models(args.out, args.corpus, args.vocab_size, args.seed)
    print(json.dumps({name: str(path) for name, path in paths.items()}))


if __name__ == "__main__":
    main()
