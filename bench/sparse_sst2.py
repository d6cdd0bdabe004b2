"""LT-SFT on MiniLM-L6 / SST-2: a 5%-density sparse delta vs full fine-tuning, and composition by addition.

Three runs with the same data, batch, steps and schedule (``--steps`` each):

1. **full**: every weight of MiniLM-L6 + a new classifier head, AdamW.
2. **lt_sft**: LT-SFT's phase 2 with run 1 as its dense phase (the paper's "fine-tune fully, keep
   the K entries with the largest |θ_ft − θ₀|"): :func:`deltatune.graft` takes the top
   ``--density`` of |θ_ft − θ₀| of every linear matrix as the support, every value is reset to 0
   (θ = θ₀) and the head to its initial weights, then only those entries (+ the head) train.
3. **domain**: a second sparse delta (``lt_sft``, random 5% support, ``dense_steps: 0``) trained
   on CoLA sentences (another corpus / task of English sentences; its own head is not used).

Composition: the SST-2 task delta and the domain delta attached together (W + ΔW_task +
ΔW_domain), and as one delta added with :func:`deltatune.algebra.sparse.add_sparse`; both are
scored on SST-2 dev. Prints a markdown table and one JSON line (``--out`` writes it to a file).

    .venv/bin/python bench/sparse_sst2.py --steps 150 --out /tmp/sparse_sst2.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from sst2_worker import collate  # same padding as bench/methods_sst2.py's runs (bench/ is on sys.path)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_tsv(path: Path, limit: int, text="sentence", label="label", header=True, cols=(3, 1)) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        if header:
            rows = [(r[text].strip(), int(r[label])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        else:
            rows = [(r[cols[0]].strip(), int(r[cols[1]])) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit]


def encode(tokenizer, rows, max_length):
    ids = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    return list(zip(ids, [y for _, y in rows]))


def train(model, params, data, args, lr, pad_id, seed) -> dict:
    """AdamW (wd 0.01), linear schedule with 6% warm-up, grad-norm clip 1.0; the same loop for every run."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    model.train()
    start, losses = time.perf_counter(), []
    order: list[int] = []
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order = list(range(len(data)))
            rng.shuffle(order)
        batch = [data[order.pop()] for _ in range(args.batch_size)]
        input_ids, mask, labels = collate(batch, pad_id)
        loss = torch.nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            sys.exit(f"loss is {losses[-1]}")
    model.eval()
    return {"train_s": time.perf_counter() - start, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def accuracy(model, data, pad_id, batch_size=128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        input_ids, mask, labels = collate(data[i:i + batch_size], pad_id)
        correct += int((model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--domain-steps", type=int, default=None, help="steps of the domain delta (default --steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-sparse", type=float, default=5e-4)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    for f in (DATA / "sst2" / "train.tsv", DATA / "sst2" / "validation.tsv", DATA / "cola" / "in_domain_train.tsv"):
        if not f.is_file():
            sys.exit(f"missing {f}")

    import deltatune
    from deltatune.algebra.sparse import add_sparse
    from deltatune.core.full_copy import FullCopyBranch
    from deltatune.core.inject import iter_wrappers
    from deltatune.methods.sparse_core import SparseBranch, sparse_delta

    torch.set_num_threads(args.threads)
    tok = deltatune.load_tokenizer(args.model)
    pad_id = tok.pad_token_id
    sst_train = encode(tok, read_tsv(DATA / "sst2" / "train.tsv", args.train_examples), args.max_length)
    sst_dev = encode(tok, read_tsv(DATA / "sst2" / "validation.tsv", args.eval_examples), args.max_length)
    cola = encode(tok, read_tsv(DATA / "cola" / "in_domain_train.tsv", args.train_examples, header=False), args.max_length)

    def fresh(seed=0):
        torch.manual_seed(seed)  # the same new head θ₀ in every run
        return deltatune.load_model(args.model, task="sequence-classification", num_labels=2)

    results: dict = {"args": vars(args)}
    # 1. full fine-tuning
    full = fresh()
    for p in full.parameters():
        p.requires_grad_(True)
    log = train(full, list(full.parameters()), sst_train, args, args.lr_full, pad_id, seed=0)
    results["full"] = {**log, "accuracy": accuracy(full, sst_dev, pad_id), "trainable": sum(p.numel() for p in full.parameters())}
    print(f"full: acc {results['full']['accuracy']:.4f} ({log['train_s']:.0f} s)", flush=True)

    # 2. LT-SFT phase 2 on the top-density support of |θ_full − θ₀|
    base = fresh()
    task = deltatune.graft(base, full, args.density, name="task", modules_to_save=["classifier"])
    with torch.no_grad():
        for _, w in iter_wrappers(base):
            branch = w.deltas["task"]
            if isinstance(branch, FullCopyBranch):
                branch.modules_to_save.load_state_dict(w.base_layer.state_dict())  # the head restarts from θ₀ too
            else:
                branch.set_support(branch.sparse_indices)  # values ← 0: θ = θ₀ on the support
    del full
    params = [p for p in task.parameters() if p.requires_grad]
    log = train(task, params, sst_train, args, args.lr_sparse, pad_id, seed=0)
    sparse_entries = sum(b.sparse_values.numel() for _, w in iter_wrappers(base) for b in [w.deltas["task"]] if isinstance(b, SparseBranch))
    matrix_entries = sum(w.base_layer.weight.numel() for _, w in iter_wrappers(base) if isinstance(w.deltas["task"], SparseBranch))
    results["lt_sft"] = {**log, "accuracy": accuracy(task, sst_dev, pad_id), "trainable": sum(p.numel() for p in params),
                         "sparse_entries": sparse_entries, "matrix_entries": matrix_entries}
    print(f"lt_sft {args.density:g}: acc {results['lt_sft']['accuracy']:.4f} ({log['train_s']:.0f} s)", flush=True)

    # 3. a domain delta on CoLA sentences (random support), then composition on SST-2
    other = fresh(seed=1)
    dom = deltatune.attach(other, {"method": "lt_sft", "density": args.density, "seed": 1, "modules_to_save": ["classifier"]}, name="domain")
    dargs = argparse.Namespace(**{**vars(args), "steps": args.domain_steps or args.steps})
    log = train(dom, [p for p in dom.parameters() if p.requires_grad], cola, dargs, args.lr_sparse, pad_id, seed=1)
    results["domain"] = {**log, "cola_train_accuracy": accuracy(dom, cola[:1000], pad_id)}
    domain = sparse_delta(dom, "domain")
    del dom, other
    task.attach({"method": "lt_sft", "density": args.density, "seed": 1}, name="domain")  # matrices only: the SST-2 head stays the task's
    with torch.no_grad():
        for m, w in iter_wrappers(base):
            if "domain" in w.deltas:
                idx, val, _ = domain[m + ".weight"]
                w.deltas["domain"].set_support(idx)
                w.deltas["domain"].sparse_values.copy_(val)
    task.set_active(["task", "domain"])
    attached = accuracy(task, sst_dev, pad_id)
    # the same sum as one sparse delta (add_sparse on the union of the supports), folded into W; only the task's head stays a branch
    summed = add_sparse([sparse_delta(task, "task"), domain])
    task.detach("domain")
    with torch.no_grad():
        for m, w in iter_wrappers(base):
            branch = w.deltas["task"]
            if isinstance(branch, SparseBranch):
                idx, val, _ = summed[m + ".weight"]
                w.base_layer.weight.view(-1).index_add_(0, idx, val.to(w.base_layer.weight.dtype))
                branch.sparse_values.zero_()  # its entries are in W now
    task.set_active(["task"])
    added = accuracy(task, sst_dev, pad_id)
    results["composition"] = {"task_alone": results["lt_sft"]["accuracy"], "task_plus_domain_attached": attached, "task_plus_domain_add_sparse": added,
                              "union_entries": sum(v[0].numel() for v in summed.values())}
    print(f"composition: task {results['lt_sft']['accuracy']:.4f}, task+domain attached {attached:.4f}, added {added:.4f}", flush=True)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    f, s = results["full"], results["lt_sft"]
    print("| run | trainable entries | SST-2 dev accuracy | train s |\n|---|---|---|---|")
    print(f"| full fine-tuning | {f['trainable']:,} | {f['accuracy']:.4f} | {f['train_s']:.0f} |")
    print(f"| LT-SFT {args.density:.0%} (matrices) + head | {s['trainable']:,} | {s['accuracy']:.4f} | {s['train_s']:.0f} |")
    print(f"| LT-SFT task + CoLA domain delta (attached) | – | {attached:.4f} | – |")
    print(f"| LT-SFT task + CoLA domain delta (add_sparse) | – | {added:.4f} | – |")
    print("RESULT " + json.dumps(results), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
