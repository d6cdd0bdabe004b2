"""Runs side by side: gain, retention, calibration and cost in one table, three plots and a static HTML page.

A run directory (``runs/<name>/``, written by ``deltatune train``) may hold:

- ``eval.json``: what ``deltatune eval --out`` measured (the tuned model's task metrics at the top
  level, its base's on the same data under ``base_task``, retention, calibration, weight-space
  diagnostics);
- ``summary.json``: the trainer's before/after metrics (used when there is no ``eval.json``);
- ``cost.json``: the cost ledger (:mod:`deltatune.evaluation.ledger`);
- ``metrics.jsonl``: the training log (loss curves).

Every number is shown against the base numbers of the same run; when runs were measured on
different bases or data (their base numbers differ), the report says so.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from deltatune.evaluation.ledger import read_json_object, read_ledger
from deltatune.utils.errors import DataError

HIGHER_IS_BETTER = ("exact_match", "numeric_accuracy", "accuracy", "macro_f1")


def primary(metrics: dict) -> tuple[str, bool] | None:
    """The metric that decides "better" in ``metrics`` and whether higher is better."""
    for key in HIGHER_IS_BETTER:
        if key in metrics:
            return key, True
    return ("loss", False) if "loss" in metrics else None


def load_run(run_dir: str | Path) -> dict:
    """One run's row: ``{"name", "metric", "base", "tuned", "gain", "forgetting", "ece", "intruders", "cost", "curve"}``.

    ``gain`` is signed so that positive is better (a loss's drop counts as gain)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {str(run_dir)!r} does not exist")
    measured = read_json_object(run_dir / "eval.json", "eval record")
    summary = read_json_object(run_dir / "summary.json", "run summary")
    if measured is not None:  # deltatune eval's record: task metrics at the top level
        tuned, base = {k: v for k, v in measured.items() if k in HIGHER_IS_BETTER + ("loss",)}, measured.get("base_task") or {}
    elif summary is not None:
        tuned, base = summary.get("after", {}), summary.get("before", {})
    else:
        raise DataError(f"{run_dir}: neither eval.json (deltatune eval --out) nor summary.json (deltatune train) is there")
    found = primary(tuned)
    row: dict = {"name": run_dir.name, "metric": None, "base": None, "tuned": None, "gain": None}
    # forgetting: general-text loss − base's; icl_forgetting: base's few-shot accuracy − tuned's (mean over probes);
    # facts_kept: precision@1 on the cloze facts the base knows.
    if found:
        key, higher = found
        row.update(metric=key, tuned=tuned[key], base=base.get(key))
        if row["base"] is not None:
            row["gain"] = (tuned[key] - base[key]) * (1 if higher else -1)
    measured = measured or {}
    row["forgetting"] = (measured.get("retention") or {}).get("forgetting")
    row["ece"] = (measured.get("calibration") or {}).get("ece")
    row["intruders"] = ((measured.get("diagnostics") or {}).get("summary") or {}).get("intruders")
    probes = measured.get("probes") or {}
    icl = [p["forgetting"] for p in (probes.get("in_context") or {}).values()]
    row["icl_forgetting"] = sum(icl) / len(icl) if icl else None
    row["facts_kept"] = (probes.get("knowledge") or {}).get("precision_at_1")
    row["cost"] = read_ledger(run_dir) or {}
    log = run_dir / "metrics.jsonl"
    row["curve"] = []
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if "loss" in entry and "step" in entry:
                row["curve"].append((entry["step"], entry["loss"]))
    return row


def _fmt(value, kind: str = "num") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed":
        return f"{value:+.4f}"
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "mb":
        return f"{value / 2**20:.2f}"
    if kind == "flops":
        return f"{value:.2e}"
    return f"{value:.4g}"


COLUMNS = [  # header, how to get it from a row, format
    ("run", lambda r: r["name"], "str"),
    ("metric", lambda r: r["metric"], "str"),
    ("base", lambda r: r["base"], "num"),
    ("tuned", lambda r: r["tuned"], "num"),
    ("gain", lambda r: r["gain"], "signed"),
    ("forgetting (Δ text loss)", lambda r: r["forgetting"], "signed"),
    ("in-context forgetting", lambda r: r["icl_forgetting"], "signed"),
    ("facts kept", lambda r: r["facts_kept"], "pct"),
    ("ECE", lambda r: r["ece"], "num"),
    ("intruders", lambda r: r["intruders"], "count"),
    ("trainable params", lambda r: r["cost"].get("trainable_params"), "count"),
    ("delta MB", lambda r: r["cost"].get("delta_bytes"), "mb"),
    ("train s", lambda r: r["cost"].get("train_seconds"), "num"),
    ("tokens/s", lambda r: r["cost"].get("tokens_per_second"), "num"),
    ("peak RSS MB", lambda r: r["cost"].get("peak_rss_mb"), "num"),
    ("est. FLOPs", lambda r: r["cost"].get("estimated_flops"), "flops"),
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[str(get(r)) if kind == "str" and get(r) is not None else _fmt(get(r), kind) for _, get, kind in COLUMNS] for r in rows]


def text_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (what the CLI prints)."""
    header = [h for h, _, _ in COLUMNS]
    body = table_rows(rows)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(cells) + " |" for cells in body])


def base_mismatch(rows: list[dict]) -> str | None:
    """A note when runs scored with one metric report different base values (different base or data)."""
    by_metric: dict[str, set] = {}
    for r in rows:
        if r["metric"] and r["base"] is not None:
            by_metric.setdefault(r["metric"], set()).add(round(r["base"], 9))
    odd = [m for m, values in by_metric.items() if len(values) > 1]
    return f"runs report different base values for {', '.join(odd)}: they were measured on different bases or data" if odd else None


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plots(rows: list[dict]) -> dict[str, bytes]:
    """``{"gain_vs_forgetting", "loss_curves", "cost"}`` → PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = [r for r in rows if r["gain"] is not None]
    for r in points:
        x = r["forgetting"] if r["forgetting"] is not None else 0.0
        ax.scatter(x, r["gain"], s=50)
        ax.annotate(r["name"], (x, r["gain"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel("forgetting: general-text loss − base's (→ worse)")
    ax.set_ylabel(f"gain in {points[0]['metric'] if points else 'the task metric'} (↑ better)")
    ax.set_title("gain vs forgetting")
    fig.tight_layout()
    out["gain_vs_forgetting"] = _figure_png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves")
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out["loss_curves"] = _figure_png(fig)
    plt.close(fig)

    costs = [("trainable params", "trainable_params"), ("train seconds", "train_seconds"), ("peak RSS MB", "peak_rss_mb")]
    fig, axes = plt.subplots(1, len(costs), figsize=(10, 3.4))
    names = [r["name"] for r in rows]
    for ax, (label, key) in zip(axes, costs):
        ax.bar(range(len(rows)), [r["cost"].get(key) or 0 for r in rows], color="tab:orange")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    out["cost"] = _figure_png(fig)
    plt.close(fig)
    return out


def html_report(rows: list[dict], images: dict[str, bytes], title: str = "deltatune compare") -> str:
    """One self-contained page: the table and the plots inline (no network, no other files)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h, _, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in table_rows(rows))
    note = base_mismatch(rows)
    figures = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{esc(name.replace("_", " "))}</figcaption></figure>'
        for name, png in images.items())
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
             "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td:first-child,td:nth-child(2){text-align:left}"
             "figure{display:inline-block;margin:1em}.note{color:#a40}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>Gain is the primary task metric's change from the base (positive: better); forgetting is the "
            f"general-text loss minus the base's on the same text (positive: ability lost).</p>"
            + (f"<p class='note'>{esc(note)}</p>" if note else "")
            + f"<table id='comparison'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figures}</body></html>")
