"""GOT-D warm-up before SST-2 fine-tuning (issue 8, part c): no warm-up vs a random warm-up vs a
GOT-D warm-up, each followed by the same SST-2 fine-tune of MiniLM-L6.

Candidate pool: AG News article descriptions (``../shared/data/ag_news/train_subset.tsv``, text only,
10,001 rows). Target sample: the first ``--target`` SST-2 validation sentences (text only; those
rows are left out of the evaluation). ``deltatune select`` with ``got_d`` picks ``--budget`` of the
pool whose embeddings move the pool's distribution toward the target's; the random warm-up takes
the same number of pool rows by seed. Warm-up = continued masked-LM training of the encoder on the
chosen text (BERT's 15 % masking; MiniLM-L6 ships no MLM head, so one is added, with its decoder
tied to the word embeddings). Then every model gets the same fine-tune (full fine-tuning on the
first ``--ft-rows`` SST-2 training rows, the order from the fine-tune seed) and is scored on SST-2
validation rows ``--target`` … ``--target + --eval``.

    .venv/bin/python bench/selection_warmup.py                     # CPU: about an hour on 2 cores
    .venv/bin/python bench/selection_warmup.py --device cuda --threads 8

Writes ``--out`` (JSON) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ot_fusion_sst2 import fine_tune, read_tsv, scores  # noqa: E402  (bench scripts share helpers by import)
from selection import select, write_jsonl, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def ag_news_texts(path: Path) -> list[str]:
    """AG News descriptions, with the corpus' HTML-ish escapes undone (``#39;`` → ``'``, ``\\`` line breaks → space)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    fix = {"#39;": "'", "#36;": "$", "quot;": '"', "amp;": "&", "\\": " "}
    out = []
    for row in rows:
        text = row[0]
        for old, new in fix.items():
            text = text.replace(old, new)
        out.append(" ".join(text.split()))
    return [t for t in out if t]


def mlm_train(model, params, texts: list[str], tokenizer, seed: int, epochs: int, batch: int, lr: float, max_len: int,
              device: str) -> tuple[float, float]:
    """``epochs`` of masked-LM training of ``params`` on ``texts``; (first, last) mean loss of 10 steps."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    order = list(texts) * epochs
    random.Random(seed).shuffle(order)
    steps = len(order) // batch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    losses = []
    for step in range(steps):
        enc = tokenizer(order[step * batch:(step + 1) * batch], truncation=True, max_length=max_len)
        features = collator([{"input_ids": ids} for ids in enc["input_ids"]])
        loss = model(input_ids=features["input_ids"].to(device), attention_mask=(features["input_ids"] != tokenizer.pad_token_id).long().to(device),
                     labels=features["labels"].to(device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss))
    return statistics.mean(losses[:10]), statistics.mean(losses[-10:])


def fit_mlm_head(source: str, texts: list[str], tokenizer, seed: int, batch: int, lr: float, max_len: int, device: str) -> dict:
    """Fit the new MLM head alone (encoder frozen) for one pass over ``texts``. Returns its weights and
    the RNG states after the fit, so every warm-up continues exactly as if it had fitted the head itself."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM.from_pretrained(source).to(device).train()
    model.bert.requires_grad_(False)  # also freezes the decoder weight, which is tied to the word embeddings
    head = [p for p in model.parameters() if p.requires_grad]
    first, last = mlm_train(model, head, texts, tokenizer, seed, 1, batch, lr, max_len, device)
    print(f"  MLM head alone: loss {first:.3f} → {last:.3f}", file=sys.stderr, flush=True)
    return {"weights": {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith("cls.")},
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def warm_up(source: str, texts: list[str], tokenizer, seed: int, epochs: int, batch: int, lr: float, max_len: int,
            device: str, head: dict | None = None) -> dict[str, torch.Tensor]:
    """Masked-LM training of the encoder on ``texts``; returns the encoder's weights (``bert.*`` keys, prefix dropped).

    MiniLM-L6 ships no MLM head, and a random head sends noise into the encoder, so ``head`` (from
    :func:`fit_mlm_head`, fitted once on the same text for every warm-up) replaces the random one:
    only the warm-up text differs between conditions."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM.from_pretrained(source).to(device).train()
    if head is not None:
        model.load_state_dict(head["weights"], strict=False)
        torch.set_rng_state(head["rng"])
        if head["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(head["cuda_rng"])
    first, last = mlm_train(model, list(model.parameters()), texts, tokenizer, seed, epochs, batch, lr, max_len, device)
    print(f"  warm-up: MLM loss {first:.3f} → {last:.3f}", file=sys.stderr, flush=True)
    return {k.removeprefix("bert."): v.detach().cpu() for k, v in model.state_dict().items() if k.startswith("bert.")}


def classifier(source: str, seed: int, encoder: dict[str, torch.Tensor] | None):
    """MiniLM-L6 with a new 2-label head (seeded); the encoder from ``encoder`` when given."""
    import deltatune

    torch.manual_seed(seed)
    model = deltatune.load_model(source, task="sequence-classification", num_labels=2)
    if encoder is not None:
        missing, unexpected = model.bert.load_state_dict(encoder, strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)  # MLM model has no pooler
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.2, help="fraction of the AG News pool used for a warm-up")
    p.add_argument("--target", type=int, default=200, help="SST-2 validation sentences forming GOT-D's target sample")
    p.add_argument("--eval", type=int, default=1000, help="SST-2 validation sentences scored (after the target rows)")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random warm-ups")
    p.add_argument("--ft-seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds, run after every warm-up")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=5e-5)
    p.add_argument("--head-rows", type=int, default=0,
                   help="fit the new MLM head alone first on this many pool rows (the same rows for every warm-up)")
    p.add_argument("--ft-rows", type=int, default=1600)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32, help="warm-up batch size")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--model", default="minilm-l6", help="registry name or local directory of MiniLM-L6")
    p.add_argument("--data", type=Path, default=DATA, help="folder holding ag_news/ and sst2/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_selection_warmup")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_warmup.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import deltatune
    from deltatune.models.load import resolve_source

    source = resolve_source(args.model)[0]
    tokenizer = deltatune.load_tokenizer(args.model)
    pool = ag_news_texts(args.data / "ag_news" / "train_subset.tsv")
    valid = read_tsv(args.data / "sst2" / "validation.tsv")
    target, dev = valid[:args.target], valid[args.target:args.target + args.eval]
    train = read_tsv(args.data / "sst2" / "train.tsv")[:args.ft_rows]
    pool_path = write_jsonl(args.work / "pool.jsonl", [{"text": t} for t in pool])
    target_path = write_jsonl(args.work / "target.jsonl", [{"text": s} for s, _ in target])
    n = round(args.budget * len(pool))
    print(f"pool {len(pool)} AG News texts, warm-up {n}, target {len(target)}, fine-tune {len(train)} rows, dev {len(dev)}", flush=True)

    warmups = {"none": ("none", None)}  # name → (kind, text)
    for seed in args.random_seeds:
        warmups[f"random{seed}"] = ("random", random.Random(seed).sample(pool, n))
    t = time.perf_counter()
    chosen, _ = select(args.work, "got_d", {"name": "got_d"}, args.budget, args.work / "embeddings", target_path,
                       pool=pool_path, embedder=args.model, threads=args.threads)
    select_seconds = time.perf_counter() - t
    warmups["got_d"] = ("got_d", [json.loads(line)["text"] for line in chosen.read_text(encoding="utf-8").splitlines()])

    head = None
    if args.head_rows:
        head = fit_mlm_head(source, random.Random(1234).sample(pool, args.head_rows), tokenizer, 0, args.batch, 1e-3,
                            args.max_len, args.device)
    rows = []
    for name, (kind, texts) in warmups.items():
        t = time.perf_counter()
        encoder = None if texts is None else warm_up(source, texts, tokenizer, 0, args.warmup_epochs, args.batch,
                                                     args.warmup_lr, args.max_len, args.device, head)
        warm_seconds = time.perf_counter() - t
        for ft_seed in args.ft_seeds:
            model = classifier(source, ft_seed, encoder)
            fine_tune(model, train, tokenizer, ft_seed, args.ft_steps, args.ft_batch, args.ft_lr, args.ft_lr, args.max_len, args.device)
            accuracy, nll = scores(model, dev, tokenizer, args.max_len, args.device)
            rows.append({"warmup": kind, "warmup_name": name,
                         "ft_seed": ft_seed, "accuracy": accuracy, "nll": nll, "warmup_seconds": warm_seconds})
            print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for kind in ("none", "random", "got_d"):
        accs = [r["accuracy"] for r in rows if r["warmup"] == kind]
        summary[kind] = {"runs": len(accs), "mean": statistics.mean(accs), "min": min(accs), "max": max(accs)}
    print("\n| warm-up | runs | SST-2 dev accuracy, mean | min – max |\n|---|---|---|---|")
    for kind, s in summary.items():
        print(f"| {kind} | {s['runs']} | {100 * s['mean']:.2f} % | {100 * s['min']:.2f} – {100 * s['max']:.2f} % |")
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "pool": len(pool), "warmup_rows": n,
              "got_d_select_seconds": select_seconds, "device": args.device, "runs": rows, "summary": summary}
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
