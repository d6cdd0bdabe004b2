"""Calibration: does a model's confidence match how often it is right?

Expected calibration error (Guo et al., 2017), with B equal-width confidence bins on [0, 1]::

    ECE = Σ_b (n_b / N) · |acc_b − conf_b|

``conf_b`` the mean confidence and ``acc_b`` the accuracy of the n_b predictions in bin b (bin b
holds confidences in (b/B, (b+1)/B]; the first bin also holds 0). A perfectly calibrated model has
ECE 0; the reliability diagram plots acc_b against conf_b with the diagonal for reference.

Confidences come from a classifier's softmax (the probability of the predicted class) or, for a
causal LM, from the answer token: the probability of the model's most likely first answer token,
counted correct when it is the reference answer's first token.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from deltatune.utils.io import atomic_path


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 15) -> dict:
    """``{"ece": float, "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]}`` (empty bins omitted)."""
    if len(confidences) != len(correct):
        raise ValueError(f"expected_calibration_error: {len(confidences)} confidences for {len(correct)} outcomes")
    if bins < 1:
        raise ValueError(f"expected_calibration_error: bins must be >= 1, got {bins}")
    conf = torch.as_tensor(list(confidences), dtype=torch.float64)
    hit = torch.as_tensor(list(correct), dtype=torch.float64)
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("expected_calibration_error: confidences must lie in [0, 1]")
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        member = index == b
        n = int(member.sum())
        if not n:
            continue
        c, a = float(conf[member].mean()), float(hit[member].mean())
        ece += n / conf.numel() * abs(a - c)
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n, "confidence": c, "accuracy": a})
    return {"ece": ece, "bins": rows, "n": int(conf.numel())}


def classifier_confidences(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Probability of the predicted class and whether it is right; ``logits`` [N, C], ``labels`` [N]."""
    probs = logits.float().softmax(-1)
    confidence, predicted = probs.max(-1)
    return confidence.tolist(), (predicted == labels).tolist()


@torch.no_grad()
def answer_token_confidences(model, tokenizer, examples: Sequence[dict], batch_size: int = 16) -> tuple[list[float], list[bool]]:
    """For ``{"prompt", "response"}`` examples: the model's top probability for the first answer token
    after the prompt, and whether that token is the response's first token. The prompt is
    tokenized as given (render it first for chat models), with special tokens unless an example's
    ``add_special_tokens`` says otherwise."""
    device = next(model.parameters()).device
    confidences, correct = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        special = [ex.get("add_special_tokens", True) for ex in chunk]
        prompts = [tokenizer(ex["prompt"], add_special_tokens=s)["input_ids"] for ex, s in zip(chunk, special)]
        firsts = [tokenizer(ex["prompt"] + ex["response"], add_special_tokens=s)["input_ids"] for ex, s in zip(chunk, special)]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt's last token in the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float()
        probs = logits.softmax(-1)
        top, token = probs.max(-1)
        for i, (p, full) in enumerate(zip(prompts, firsts)):
            # The response's first token as tokenized together with the prompt (merges at the seam count),
            # else as tokenized alone.
            if len(full) > len(p) and full[: len(p)] == p:
                target = full[len(p)]
            else:
                target = (tokenizer(chunk[i]["response"], add_special_tokens=False)["input_ids"] or [-1])[0]
            confidences.append(float(top[i]))
            correct.append(int(token[i]) == target)
    return confidences, correct


def reliability_diagram(result: dict, path: str | Path, title: str) -> Path:
    """Accuracy against confidence per bin, bar widths the bins, the diagonal for reference (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for row in result["bins"]:
        ax.bar(row["lo"], row["accuracy"], width=row["hi"] - row["lo"], align="edge", alpha=0.7, edgecolor="black", color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {result['ece']:.3f} (n = {result['n']})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
