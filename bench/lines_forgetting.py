"""LiNeS on a single fine-tune: target accuracy vs forgetting of MiniLM-L6's sentence embeddings.

1. Fully fine-tune ``minilm-l6`` (all-MiniLM-L6-v2 + a new 2-label head) for SST-2: AdamW, linear
   schedule with 6 % warm-up, ``--steps`` batches of ``--batch`` random rows of
   ``shared/data/sst2/train.tsv``, max length ``--max-length``. Saved as a HF directory.
2. Task vector of the encoder, τ = θ_ft − θ_0. The merge base is θ_0 with the *fine-tuned* head
   (``base/``), so the head has τ = 0 and is kept as trained; every other tensor goes through
   deltatune's merge engine: recipe ``{method: task_arithmetic, lines: {alpha, beta}}`` with the
   fine-tune as the one input, i.e. θ = θ_0 + λ(l)·τ with λ(l) = α + β·l/(L−1)
   (:mod:`deltatune.algebra.lines`). ``beta = 0`` rows are uniform scalings (controls: the same
   shrink for every layer).
3. Scores of every model:
   - **target**: SST-2 accuracy on the first ``--dev`` rows of ``validation.tsv``, computed by
     :class:`deltatune.algebra.soup.Evaluator` (the training code's own evaluation);
   - **general**: the base encoder's sentence-embedding quality, which SST-2 training erodes:
     cosine similarity of mean-pooled last-layer embeddings of the two sentences of each pair of
     MRPC ``dev.tsv`` (408 pairs), scored as ROC AUC against the paraphrase labels (how
     all-MiniLM-L6-v2 is used: mean pooling, cosine). ± = bootstrap standard error over pairs.

Writes the JSON results (``--out``) and a plot (``--plot``) of target accuracy vs general AUC.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/lines_forgetting.py
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import deltatune
from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import parse_recipe
from deltatune.algebra.soup import Evaluator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
# (alpha, beta): λ(l) = α + β·l/(L−1). (0, 1) is the paper's single-task ramp (0 at the first layer, 1 at the last).
SETTINGS = [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.0, 0.5), (0.75, 0.0), (0.5, 0.0), (0.25, 0.0)]


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["sentence"].strip(), int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def read_mrpc(path: Path) -> list[tuple[str, str, int]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(r[3], r[4], int(r[0])) for r in rows]


def fine_tune(model, tokenizer, rows, args) -> list[float]:
    """Full fine-tune: AdamW (wd 0.01), linear schedule with 6 % warm-up, grad-norm clip 1.0."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = rng.sample(rows, args.batch)
        enc = tokenizer([s for s, _ in batch], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}: loss {sum(losses[-50:]) / 50:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model.eval()
    return losses


@torch.no_grad()
def embeddings(encoder, tokenizer, sentences: list[str], batch: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), L2-normalised: all-MiniLM-L6-v2's pooling."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann–Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).float().sum() + 0.5 * (pos[:, None] == neg[None, :]).float().sum()
    return (greater / (len(pos) * len(neg))).item()


def bootstrap(scores: torch.Tensor, labels: torch.Tensor, n: int = 500, seed: int = 0) -> torch.Tensor:
    """AUC on ``n`` resamples of the pairs; the same seed gives every model the same resamples (paired)."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([roc_auc(scores[idx], labels[idx]) for idx in (torch.randint(0, len(scores), (len(scores),), generator=g) for _ in range(n))])


def general_scores(model, tokenizer, pairs) -> torch.Tensor:
    """Cosine similarity of each MRPC pair under the model's encoder (``model.bert``)."""
    model.eval()
    a = embeddings(model.bert, tokenizer, [p[0] for p in pairs])
    b = embeddings(model.bert, tokenizer, [p[1] for p in pairs])
    return (a * b).sum(-1)


def lines_merge(base: Path, ft: Path, out: Path, alpha: float | None, beta: float | None) -> dict:
    """θ_0 + λ(l)·τ through deltatune's merge engine (``lines`` omitted when alpha is None)."""
    recipe = {"base": str(base), "inputs": [{"path": str(ft)}], "method": "task_arithmetic", "output": {"path": str(out)}}
    if alpha is not None:
        recipe["lines"] = {"alpha": alpha, "beta": beta}
    return run_merge(parse_recipe(recipe))


def plot(results: list[dict], path: Path) -> None:
    """Target accuracy vs general AUC; the base as a dashed line (its accuracy, with the trained head on
    an untouched encoder, is far off to the left). Error bars are left out: the settings are compared
    on the same pairs, so their paired differences (in the JSON) are much tighter than each AUC's se."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = {k: [r for r in results if r["kind"] == k] for k in ("base", "fine-tuned", "lines", "uniform")}
    ft = by_kind["fine-tuned"][0]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    base = by_kind["base"][0]
    ax.axhline(base["mrpc_auc"], ls="--", color="black", lw=1)
    ax.text(0.5, base["mrpc_auc"], f"base encoder (SST-2 {base['sst2_accuracy'] * 100:.1f} %)", ha="center", va="bottom", fontsize=8,
            transform=ax.get_yaxis_transform())
    ax.margins(y=0.08)
    uni = sorted(by_kind["uniform"], key=lambda r: r["alpha"]) + [ft]  # in order of λ, ending at λ = 1
    ax.plot([r["sst2_accuracy"] * 100 for r in uni], [r["mrpc_auc"] for r in uni], "^-", color="tab:gray", label="uniform λ (β = 0)")
    ax.plot([r["sst2_accuracy"] * 100 for r in by_kind["lines"]], [r["mrpc_auc"] for r in by_kind["lines"]], "o", color="tab:blue", label="LiNeS λ(l) = α + β·l/5")
    ax.plot([ft["sst2_accuracy"] * 100], [ft["mrpc_auc"]], "D", color="tab:red", label="fine-tuned (λ = 1)")
    for r in by_kind["uniform"]:
        ax.annotate(f"λ={r['alpha']}", (r["sst2_accuracy"] * 100, r["mrpc_auc"]), textcoords="offset points", xytext=(4, 5), fontsize=8, color="tab:gray")
    for r in by_kind["lines"]:
        ax.annotate(f"({r['alpha']}, {r['beta']})", (r["sst2_accuracy"] * 100, r["mrpc_auc"]), textcoords="offset points", xytext=(-14, -13), fontsize=8, color="tab:blue")
    ax.set_xlabel("SST-2 dev accuracy (%)  (target task)")
    ax.set_ylabel("MRPC dev ROC AUC of embedding cosine  (general)")
    ax.set_title("LiNeS (α, β) vs uniform scaling of a full MiniLM-L6 SST-2 fine-tune", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev", type=int, default=872, help="first N rows of sst2/validation.tsv")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="directory for the fine-tune and merges (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="score the fine-tune already in --work (from an earlier run) instead of training")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lines_forgetting.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "lines_forgetting.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lines_"))
    work.mkdir(parents=True, exist_ok=True)

    tokenizer = deltatune.load_tokenizer("minilm-l6")
    torch.manual_seed(args.seed)
    model = deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    info_file = work / "ft" / "train_info.json"
    if args.reuse:
        info = json.loads(info_file.read_text())
        model.load_state_dict(load_file(str(work / "ft" / "model.safetensors")), strict=False)
    else:
        losses = fine_tune(model, tokenizer, read_sst2(DATA / "sst2" / "train.tsv"), args)
        info = {"steps": args.steps, "batch": args.batch, "max_length": args.max_length, "lr": args.lr, "seed": args.seed,
                "optimizer": "AdamW wd 0.01, linear schedule, 6% warm-up, clip 1.0", "final_loss_mean_last_50": sum(losses[-50:]) / min(50, len(losses)),
                "train_seconds": round(time.perf_counter() - t0, 1)}
        model.save_pretrained(work / "ft")
        tokenizer.save_pretrained(work / "ft")
        info_file.write_text(json.dumps(info, indent=2) + "\n")
    # The merge base: θ_0 with the trained head (τ_head = 0: LiNeS scales the encoder's task vector only).
    base_state = {k: (model.state_dict()[k] if k.startswith("classifier.") else v) for k, v in init.items()}
    model.load_state_dict(base_state)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")

    # The merge path with no LiNeS must give back the fine-tune exactly (a check of the set-up).
    lines_merge(work / "base", work / "ft", work / "identity", None, None)
    ft_w, id_w = load_file(str(work / "ft" / "model.safetensors")), load_file(str(work / "identity" / "model.safetensors"))
    identity_err = max((ft_w[k].float() - id_w[k].float()).abs().max().item() for k in ft_w)

    evaluator = Evaluator(work / "base", DATA / "sst2" / "validation.tsv", "sequence-classification", num_labels=2, max_examples=args.dev, batch_size=128)
    pairs = read_mrpc(DATA / "mrpc" / "dev.tsv")
    labels = torch.tensor([p[2] for p in pairs])

    boots: dict[str, torch.Tensor] = {}

    def score(name: str, kind: str, weights: dict, alpha=None, beta=None) -> dict:
        start = time.perf_counter()
        acc = evaluator.score(weights)["accuracy"]
        sims = general_scores(evaluator.model, tokenizer, pairs)
        boots[name] = bootstrap(sims, labels)
        r = {"name": name, "kind": kind, "alpha": alpha, "beta": beta, "sst2_accuracy": acc,
             "mrpc_auc": roc_auc(sims, labels), "mrpc_auc_se": boots[name].std().item()}
        print(f"{name:>22}: SST-2 {acc * 100:.2f} %  MRPC AUC {r['mrpc_auc']:.4f} ± {r['mrpc_auc_se']:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        return r

    # The base encoder's SST-2 accuracy is with the trained head on top (a linear probe of the
    # frozen-then-moved features is not what this measures; it is the λ = 0 end of the line).
    results = [score("base (λ=0)", "base", load_file(str(work / "base" / "model.safetensors"))),
               score("fine-tuned (λ=1)", "fine-tuned", ft_w)]
    for alpha, beta in SETTINGS:
        out = work / f"lines_{alpha}_{beta}"
        lines_merge(work / "base", work / "ft", out, alpha, beta)
        kind = "uniform" if beta == 0 else "lines"
        name = f"uniform λ={alpha}" if beta == 0 else f"LiNeS α={alpha} β={beta}"
        results.append(score(name, kind, load_file(str(out / "model.safetensors")), alpha, beta))

    # Paired: the change of AUC from the fine-tune, and its bootstrap standard error over the same resamples.
    ft_name = results[1]["name"]
    for r in results:
        diff = boots[r["name"]] - boots[ft_name]
        r["mrpc_auc_gain_vs_ft"] = r["mrpc_auc"] - results[1]["mrpc_auc"]
        r["mrpc_auc_gain_vs_ft_se"] = diff.std().item()

    report = {
        "model": "minilm-l6 (sentence-transformers/all-MiniLM-L6-v2), BertForSequenceClassification, 2 labels",
        "fine_tune": {**info, "reused_from_earlier_run": args.reuse},
        "target": f"SST-2 accuracy, first {args.dev} rows of shared/data/sst2/validation.tsv (deltatune Evaluator)",
        "general": ("MRPC dev (408 pairs) ROC AUC of the cosine of mean-pooled embeddings; se = bootstrap standard error (500 resamples); "
                    "gain_vs_ft = AUC minus the fine-tune's, its se from the same (paired) resamples"),
        "merge": "deltatune merge: task_arithmetic, one input (the fine-tune), base = θ_0 + trained head, lines: {alpha, beta}",
        "identity_merge_max_abs_err": identity_err,
        "threads": args.threads, "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot(results, Path(args.plot))
    print("| model | λ (layer 0 → layer 5) | SST-2 dev acc | MRPC AUC (general) | AUC vs fine-tuned (paired se) |")
    print("|---|---|---|---|---|")
    for r in results:
        ramp = "—" if r["alpha"] is None else f"{r['alpha']:.2f} → {r['alpha'] + r['beta']:.2f}"
        gain = f"{r['mrpc_auc_gain_vs_ft']:+.4f} ± {r['mrpc_auc_gain_vs_ft_se']:.4f}"
        print(f"| {r['name']} | {ramp} | {r['sst2_accuracy'] * 100:.2f} % | {r['mrpc_auc']:.4f} ± {r['mrpc_auc_se']:.4f} | {gain} |")
    print(f"total {report['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
