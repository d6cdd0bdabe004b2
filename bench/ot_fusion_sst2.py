"""OT fusion vs plain averaging of two MiniLM-L6 SST-2 fine-tunes whose heads have a hidden layer.

MiniLM's classifier is replaced by ``dense → activation → out_proj`` (RoBERTa's / ELECTRA's head
shape), initialised from each run's seed; the encoder starts from the same pretrained weights.
So the encoder's units stay in correspondence across seeds, the head's hidden units do not —
the case OT fusion is for, in two real fine-tunes. Each pair of seeds is fine-tuned (full
fine-tuning, the head at a higher learning rate), then scored on SST-2 dev (accuracy / mean
negative log-likelihood): model a, model b, their plain average, and OT fusion with ``heads``
False / True. Also printed: how well each pairing of the head's hidden units matches them (mean
correlation of paired units' activations on dev sentences), by position and by the OT plan.

    .venv/bin/python bench/ot_fusion_sst2.py --pairs 1,2 3,4 5,6 --steps 200 --out /tmp/ot_head.json
    .venv/bin/python bench/ot_fusion_sst2.py --depth 3 --hidden 128 --activation gelu --device cuda \
        --pairs 1,2 3,4 5,6 7,8 9,10 11,12 13,14 15,16     # session 6's head: OT beats averaging on the mean

Fine-tuned weights are cached under ``--cache`` (one file per seed and setting), so re-scoring is cheap.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(s.strip(), int(label)) for s, label in rows[1:]]


def head_model(seed: int, hidden: int, activation: str, depth: int = 1, source: str = "minilm-l6"):
    """MiniLM-L6 for 2-label classification with a seeded head of ``depth`` hidden layers:
    ``Linear(384, hidden) → act → … → Linear(hidden, 2)``."""
    import deltatune

    torch.manual_seed(seed)
    model = deltatune.load_model(source, task="sequence-classification", num_labels=2)
    layers, width = [], model.config.hidden_size
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    model.classifier = nn.Sequential(*layers, nn.Linear(width, 2))
    return model


def fine_tune(model, rows, tokenizer, seed: int, steps: int, batch: int, lr: float, head_lr: float, max_len: int,
              device: str = "cpu"):
    """Full fine-tuning (encoder at ``lr``, 0 = frozen), AdamW, linear decay; data order from ``seed``."""
    rows = list(rows)
    model.to(device)
    random.Random(seed).shuffle(rows)
    head = list(model.classifier.parameters())
    ids = {id(p) for p in head}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
                             {"params": head, "lr": head_lr}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        loss = model(**enc.to(device), labels=torch.tensor([y for _, y in chunk], device=device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.cpu().eval()


@torch.no_grad()
def scores(model, rows, tokenizer, max_len: int, device: str = "cpu") -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) on ``rows``."""
    model.to(device).eval()
    logits = []
    for i in range(0, len(rows), 128):
        enc = tokenizer([s for s, _ in rows[i:i + 128]], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        logits.append(model(**enc.to(device)).logits.float().cpu())
    model.cpu()
    logits, labels = torch.cat(logits), torch.tensor([y for _, y in rows])
    return float((logits.argmax(-1) == labels).float().mean()), float(nn.functional.cross_entropy(logits, labels))


def average(models):
    """Position-wise average, same float64 arithmetic as ``ot_fuse`` (so the two differ only by the alignment)."""
    states = [m.state_dict() for m in models]
    out = copy.deepcopy(models[0])
    out.load_state_dict({k: sum(s[k].double() / len(states) for s in states).to(v.dtype) if v.is_floating_point() else v
                         for k, v in states[0].items()})
    return out


@torch.no_grad()
def hidden_units(model, enc) -> torch.Tensor:
    """The head's hidden activations (what ``classifier[2]`` receives), [units, sentences]."""
    seen = []
    hook = model.classifier[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model.eval()(**enc)
    hook.remove()
    return seen[0].double().T


def head_match(a, b, dev_enc) -> dict[str, float]:
    """Mean correlation, over dev sentences, between each head unit of a and the unit of b it is paired
    with: by position (what plain averaging pairs) and by the OT plan (what ``ot_fuse`` pairs)."""
    from deltatune.algebra.ot_fusion import align_to, neuron_groups

    groups = neuron_groups(a)
    k = [g.inputs for g in groups].index(("classifier.0",))
    plans = {"position": torch.eye(a.classifier[0].out_features, dtype=torch.float64),
             "ot_plan": align_to(a.state_dict(), b.state_dict(), groups)[1][k]}
    fa, fb = (hidden_units(m, dev_enc) for m in (a, b))
    out = {}
    for name, t in plans.items():
        x, y = fa - fa.mean(1, keepdim=True), t @ fb
        y = y - y.mean(1, keepdim=True)
        corr = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
        out[name] = float(corr.nanmean())  # a dead ReLU unit (constant output) has no correlation
    return out


def paired_summary(results: list[dict], column: str, baseline: str = "average") -> dict:
    """OT fusion vs plain averaging over the seed pairs: mean accuracy of both, the mean paired
    difference with its standard error, and wins / ties / losses (by dev rows, not by noise)."""
    diffs = torch.tensor([r[column][0] - r[baseline][0] for r in results], dtype=torch.float64)
    sem = float(diffs.std() / len(diffs) ** 0.5) if len(diffs) > 1 else float("nan")
    return {"pairs": len(diffs), column: sum(r[column][0] for r in results) / len(results),
            baseline: sum(r[baseline][0] for r in results) / len(results), "mean_difference": float(diffs.mean()),
            "standard_error": sem, "wins": int((diffs > 1e-9).sum()), "ties": int((diffs.abs() <= 1e-9).sum()),
            "losses": int((diffs < -1e-9).sum())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["1,2", "3,4", "5,6"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1, help="hidden layers in the classification head")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--eval", type=int, default=872)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ot_fusion_sst2"))
    parser.add_argument("--model", default="minilm-l6", help="registry name or local directory of MiniLM-L6")
    parser.add_argument("--data", type=Path, default=SST2, help="folder with SST-2's train.tsv / validation.tsv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import deltatune
    from deltatune.algebra.ot_fusion import neuron_groups, ot_fuse

    tokenizer = deltatune.load_tokenizer(args.model)
    train = read_tsv(args.data / "train.tsv")[: args.steps * args.batch]
    dev = read_tsv(args.data / "validation.tsv")[: args.eval]
    dev_enc = tokenizer([s for s, _ in dev[:256]], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
    args.cache.mkdir(parents=True, exist_ok=True)
    depth = f"x{args.depth}" if args.depth > 1 else ""
    setting = f"h{args.hidden}{depth}-{args.activation}-s{args.steps}-b{args.batch}-lr{args.lr:g}-hlr{args.head_lr:g}-len{args.max_len}"

    def trained(seed: int):
        model = head_model(seed, args.hidden, args.activation, args.depth, args.model)
        path = args.cache / f"{setting}-seed{seed}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        t0 = time.process_time()
        fine_tune(model, train, tokenizer, seed, args.steps, args.batch, args.lr, args.head_lr, args.max_len, args.device)
        print(f"seed {seed}: fine-tuned in {time.process_time() - t0:.0f} s CPU", file=sys.stderr, flush=True)
        torch.save(model.state_dict(), path)
        return model

    def score(model):
        return scores(model, dev, tokenizer, args.max_len, args.device)

    results = []
    for pair in args.pairs:
        sa, sb = (int(s) for s in pair.split(","))
        a, b = trained(sa), trained(sb)
        groups = [g.inputs for g in neuron_groups(a)]
        assert ("classifier.0",) in groups, groups
        row = {"seeds": [sa, sb], "a": score(a), "b": score(b), "average": score(average([a, b]))}
        for heads in (False, True):
            fused = copy.deepcopy(a)
            fused.load_state_dict(ot_fuse([a, b], heads=heads))
            row[f"ot{'_heads' if heads else ''}"] = score(fused)
        row["head_match"] = head_match(a, b, dev_enc)
        print(json.dumps(row), file=sys.stderr, flush=True)
        results.append(row)
    summary = paired_summary(results, "ot")
    report = {"setting": setting, "eval_rows": len(dev), "train_rows": len(train),
              "metrics": ["accuracy", "nll"], "results": results, "summary": summary}
    columns = [k for k in results[0] if k not in ("seeds", "head_match")]
    print("| seeds | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for r in results:
        print(f"| {r['seeds'][0]}, {r['seeds'][1]} | " + " | ".join(f"{100 * r[c][0]:.2f} % / {r[c][1]:.3f}" for c in columns) + " |")
    print("\nhead units paired (mean activation correlation on 256 dev sentences):")
    for r in results:
        print(f"  seeds {r['seeds']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["head_match"].items()))
    print(f"\nOT fusion vs plain average over {summary['pairs']} pairs: {100 * summary['ot']:.2f} % vs "
          f"{100 * summary['average']:.2f} %, difference {100 * summary['mean_difference']:+.2f} ± "
          f"{100 * summary['standard_error']:.2f} points (s.e.), wins / ties / losses "
          f"{summary['wins']} / {summary['ties']} / {summary['losses']}")
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
