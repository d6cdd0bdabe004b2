"""The cost ledger of a training run, written by the trainer to ``runs/<name>/cost.json``.

Estimated training FLOPs for T tokens through a model of N parameters, N_t of them trained:
the forward pass costs 2·N·T, the backward pass 2·N·T for activation gradients (through every
layer, frozen or not) plus 2·N_t·T for the trained weights' gradients::

    FLOPs ≈ 4·N·T + 2·N_t·T      (6·N·T for full fine-tuning, Kaplan et al.'s rule)

Attention's sequence-length term is left out, as in that rule; for short contexts it is small.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from deltatune.utils.errors import DeltaFileError
from deltatune.utils.io import write_json_atomic

LEDGER_FILE = "cost.json"


def estimate_training_flops(total_params: int, trainable_params: int, tokens: int) -> float:
    return float(4 * total_params * tokens + 2 * trainable_params * tokens)


@dataclass(frozen=True)
class CostLedger:
    trainable_params: int
    total_params: int
    stored_params: int          # parameters in the saved delta (or the whole model for full fine-tuning)
    delta_bytes: int            # bytes of the saved delta directory on disk
    train_seconds: float
    steps: int
    tokens: int                 # real (non-padding) training tokens
    examples: int
    peak_rss_mb: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def estimated_flops(self) -> float:
        return estimate_training_flops(self.total_params, self.trainable_params, self.tokens)

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second, "examples_per_second": self.examples_per_second,
                "estimated_flops": self.estimated_flops}


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (a saved delta or model directory)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def stored_parameters(path: str | Path) -> int:
    """Numbers stored in the safetensors files under ``path`` (read from their headers, no tensor loaded)."""
    total = 0
    for file in Path(path).rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def write_ledger(run_dir: str | Path, ledger: CostLedger) -> Path:
    path = Path(run_dir) / LEDGER_FILE
    write_json_atomic(path, ledger.to_json())
    return path


def read_ledger(run_dir: str | Path) -> dict | None:
    """The run's ledger as written (derived fields included), or None when the run has none."""
    return read_json_object(Path(run_dir) / LEDGER_FILE, "cost ledger")


def read_json_object(path: Path, what: str) -> dict | None:
    """A JSON object file of a run (None when absent); unreadable or not an object is a one-line error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeltaFileError(f"{path}: not a readable {what} ({err})") from None
    if not isinstance(data, dict):
        raise DeltaFileError(f"{path}: expected a JSON object")
    return data
