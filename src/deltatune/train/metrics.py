"""Metrics: classification scores, the metrics.jsonl log and the loss-curve plot."""
from __future__ import annotations

import json
import resource
from pathlib import Path

from deltatune.utils.errors import ConfigError
from deltatune.utils.io import atomic_path


def accuracy_and_macro_f1(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """accuracy = mean(pred == label); macro-F1 = mean over classes seen in labels or predictions."""
    if not labels:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the checkpoint's step are dropped.

    ``tensorboard``: a directory for TensorBoard event files as well (one scalar per numeric field,
    at the row's step), written with TensorBoard's own writer."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: Path | None = None):
        self.path = path
        self.rows: list[dict] = []
        self.writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: only with train.report_to: tensorboard
            except ImportError:
                raise ConfigError("train.report_to: tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(log_dir=str(tensorboard), purge_step=resume_step + 1 if resume_step is not None else None)
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path.exists():
            path.unlink()

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(rows: list[dict], path: Path, title: str) -> None:
    """Training loss (and eval metrics, if logged) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
