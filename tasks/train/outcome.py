"""What a training run produced: metrics, and where its checkpoints, model and curve are.

The outcome crosses three boundaries: from a torchrun rank back to the launcher (a JSON file),
from a finished run to a later re-run (`train_result.json` beside the checkpoints: a re-run of a
finished run returns it instead of training again), and from the training task to the flow and
to MLflow. One typed record, validated whenever it is read back, serves all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter


@dataclass(frozen=True)
class TrainOutcome:
    """The result of `tasks.train.run.fit_model` (rank 0's view, counts summed over ranks)."""

    run_name: str
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    tokens_seen: int
    tokens_per_second: float | None
    nonpad_fraction: float | None
    checkpoint_uri: str
    resumed_from_step: int | None
    output_uri: str
    final_model_uri: str
    final_model_dir: str
    loss_curve_uri: str
    loss_curve_path: str
    log_history_path: str
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    already_trained: bool = False

    def to_json(self) -> str:
        return _ADAPTER.dump_json(self, indent=2).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainOutcome:
        return _ADAPTER.validate_json(text)

    @classmethod
    def read(cls, path: Path) -> TrainOutcome:
        return cls.from_json(Path(path).read_bytes())


_ADAPTER = TypeAdapter(TrainOutcome)
