"""Training throughput: useful tokens, padding share, MFU estimate, and the loss-curve image.

"Useful" tokens are the real (non-padding) tokens of inputs and labels, as counted by
`tasks.train.packing.count_tokens`; a run that pads a lot moves many slots but few useful tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.train.packing import count_tokens

# Dense peak FLOP/s per GPU (bf16, tf32) from the vendors' datasheets. Matched by substring of
# torch.cuda.get_device_name(); order matters (H100 PCIe before H100).
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16
    ("T4", 65e12, 8.1e12),
]


@dataclass
class TokenMeter:
    """Running counts of real tokens and total slots over the training batches."""

    input_tokens: int = 0
    label_tokens: int = 0
    tokens: int = 0
    slots: int = 0
    batches: int = 0

    def add(self, batch: Mapping[str, Any], pad_id: int | None) -> None:
        """Count one batch (input_ids, labels) of the training loop."""
        c = count_tokens(batch, pad_id)
        self.input_tokens += c["input_tokens"]
        self.label_tokens += c["label_tokens"]
        self.tokens += c["tokens"]
        self.slots += c["slots"]
        self.batches += 1

    @property
    def nonpad_fraction(self) -> float | None:
        return self.tokens / self.slots if self.slots else None

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TokenMeter:
        data = data or {}
        return cls(**{k: int(data.get(k, 0)) for k in cls.__dataclass_fields__})

    def merged(self, other: TokenMeter) -> TokenMeter:
        return TokenMeter(
            **{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__}
        )


def encoder_decoder_params(model: Any) -> tuple[int, int]:
    """Matmul parameters of the encoder and of the decoder plus LM head (no embedding tables)."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()

    def _count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in embeddings)

    encoder = _count(model.get_encoder())
    decoder = _count(model.get_decoder())
    if head is not None:
        # The LM head (tied to the embedding table or not) is a full matmul per target token.
        decoder += head.weight.numel()
    return encoder, decoder


def train_flops(
    encoder_params: int, decoder_params: int, input_tokens: int, label_tokens: int
) -> float:
    """Training FLOPs, 6 x params x tokens per stack (forward 2, backward 4; attention ignored)."""
    return 6.0 * (encoder_params * input_tokens + decoder_params * label_tokens)


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """Datasheet dense peak FLOP/s of a GPU by name, or None when unknown."""
    for key, bf16_peak, tf32_peak in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return bf16_peak if bf16 else tf32_peak
    return None


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (None without a peak)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * devices)


def plot_loss_curve(log_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write train/eval loss by step as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
