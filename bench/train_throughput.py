"""LoRA training throughput and memory: deltatune vs PEFT + a plain torch loop, same run.

    python bench/train_throughput.py [--steps 10] [--bf16-steps 50] [--threads 2]

The same LoRA (r=16, alpha=32, all linear layers of SmolLM2-135M-Instruct), the same data
(real instruction text, 8 rows x 256 tokens per step), the same initial adapter and AdamW
(lr 1e-4) in every configuration. Each configuration runs in a fresh process so peak RSS is its
own. Printed: tokens/s, peak RSS, the loss of every step, the ratios to PEFT, and the achieved
FLOP/s as a fraction of this machine's peak (see ``peak_flops``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ, BATCH, RANK, ALPHA, LR = 256, 8, 16, 32, 1e-4
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo" / "alpaca_en_demo.json"


def batches(tokenizer, steps: int):
    """``steps`` batches of [BATCH, SEQ] token ids: the instruction set's text, concatenated."""
    import torch

    records = json.loads(DATA.read_text())
    text = "\n\n".join(r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in records)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = steps * BATCH * SEQ
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids).view(steps, BATCH, SEQ)


def worker(kind: str, steps: int, init_dir: str, bf16: bool, threads: int, tuned_malloc: bool, compile: bool = False) -> dict:
    import torch

    from deltatune.utils.memory import tune_allocator

    if tuned_malloc:  # what deltatune's trainer does at start-up; also tried on PEFT for a fair view
        tune_allocator()

    torch.set_num_threads(threads)
    import deltatune

    tokenizer = deltatune.load_tokenizer("smollm2-135m-instruct")
    data = batches(tokenizer, steps)
    base = deltatune.load_model("smollm2-135m-instruct")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if kind == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(base, init_dir, is_trainable=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss
    else:
        from deltatune.train.config import OptimConfig
        from deltatune.train.objective import CausalLMObjective
        from deltatune.train.optim import build_optimizer

        model = deltatune.load_delta(base, init_dir)
        model.set_trainable(["default"])
        model.train()
        objective = CausalLMObjective(model, chunk_size=512)
        if compile:  # what `train.compile: true` does in the trainer
            objective = torch.compile(objective)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, OptimConfig(lr=LR, max_grad_norm=None))

        def loss_fn(ids):
            loss_sum, n = objective({"input_ids": ids, "labels": ids})
            return loss_sum / n
    losses, times = [], []
    for ids in data:
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    # The first step pays one-time allocation costs (and, compiled, the compilation: two steps).
    skip = 2 if compile else 1
    timed = times[skip:] or times
    return {"kind": kind, "bf16": bf16, "losses": losses, "tokens_per_s": BATCH * SEQ * len(timed) / sum(timed),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "trainable": sum(p.numel() for p in params)}


def peak_flops(threads: int) -> tuple[float, str]:
    """Peak fp32 FLOP/s: cores x clock x FLOPs/cycle (2 AVX-512 FMA units x 16 fp32 lanes x 2)."""
    mhz = 0.0
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":")[1])
        if line.startswith("flags") and not flags:
            flags = line
    lanes = 16 if "avx512f" in flags else 8
    per_cycle = 2 * lanes * 2
    return threads * mhz * 1e6 * per_cycle, f"{threads} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle ({'AVX-512' if lanes == 16 else 'AVX2'}, 2 FMA units)"


def train_flops_per_token(n_params_matmul: int) -> float:
    """Forward 2N + backward ~2N (input grads only: base weights are frozen) per token, N = matmul params."""
    return 4 * n_params_matmul


def run_one(kind, steps, init_dir, bf16, threads, tuned_malloc=None, compile=False) -> dict:
    tuned_malloc = kind == "deltatune" if tuned_malloc is None else tuned_malloc
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--init", init_dir,
                          "--threads", str(threads)] + (["--bf16"] if bf16 else []) + (["--tuned-malloc"] if tuned_malloc else [])
                         + (["--compile"] if compile else []),
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bf16-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--init")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tuned-malloc", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also run deltatune with torch.compile (train.compile: true)")
    parser.add_argument("--only-fp32", action="store_true", help="skip the PEFT + tuned malloc configuration")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.init, args.bf16, args.threads, args.tuned_malloc, args.compile)))
        return

    import torch

    import deltatune

    init_dir = tempfile.mkdtemp(prefix="bench-init-")
    torch.manual_seed(0)
    model = deltatune.attach(deltatune.load_model("smollm2-135m-instruct"), deltatune.LoraConfig(r=RANK, alpha=ALPHA, targets="all-linear"))
    with torch.no_grad():  # a non-zero B so the first steps already differ from the base model
        for name, p in model.delta_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.save_delta(init_dir)
    matmul_params = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    del model

    results = {
        "peft fp32": run_one("peft", args.steps, init_dir, False, args.threads),
        "deltatune fp32": run_one("deltatune", args.steps, init_dir, False, args.threads),
    }
    if not args.only_fp32:
        results["peft fp32 + tuned malloc"] = run_one("peft", args.steps, init_dir, False, args.threads, tuned_malloc=True)
    if args.compile:
        results["deltatune fp32 compiled"] = run_one("deltatune", args.steps + 1, init_dir, False, args.threads, compile=True)
    if args.bf16_steps:
        results["deltatune bf16"] = run_one("deltatune", args.bf16_steps, init_dir, True, args.threads)
        results["deltatune fp32 (long)"] = run_one("deltatune", args.bf16_steps, init_dir, False, args.threads)
    peak, how = peak_flops(args.threads)
    ref = results["peft fp32"]
    print(f"\nSmolLM2-135M LoRA r={RANK} all-linear, seq {SEQ} x batch {BATCH}, AdamW, {args.threads} threads")
    print(f"{'config':<24}{'tokens/s':>10}{'x PEFT':>8}{'peak RSS GB':>13}{'x PEFT':>8}{'% of peak FLOP/s':>18}")
    for name, r in results.items():
        achieved = r["tokens_per_s"] * train_flops_per_token(matmul_params)
        print(f"{name:<24}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / ref['tokens_per_s']:>8.2f}"
              f"{r['peak_rss_gb']:>13.2f}{r['peak_rss_gb'] / ref['peak_rss_gb']:>8.2f}{100 * achieved / peak:>17.1f}%")
    diffs = [abs(a - b) for a, b in zip(results["peft fp32"]["losses"], results["deltatune fp32"]["losses"])]
    print(f"\nloss, first {args.steps} steps: max |deltatune - PEFT| = {max(diffs):.2e}")
    print("  peft     :", " ".join(f"{x:.4f}" for x in results["peft fp32"]["losses"]))
    print("  deltatune:", " ".join(f"{x:.4f}" for x in results["deltatune fp32"]["losses"]))
    if args.compile:
        c = results["deltatune fp32 compiled"]["losses"]
        print(f"compiled vs eager, first {args.steps} steps: max |difference| = {max(abs(x - y) for x, y in zip(c, results['deltatune fp32']['losses'])):.2e}")
    if args.bf16_steps:
        a, b = results["deltatune bf16"]["losses"], results["deltatune fp32 (long)"]["losses"]
        rel = max(abs(x - y) / y for x, y in zip(a, b))
        print(f"bf16 vs fp32 over {args.bf16_steps} steps: max relative loss difference {100 * rel:.2f}%")
    print(f"peak FLOP/s = {peak / 1e9:.0f} GFLOP/s: {how}; achieved = tokens/s x 4 x {matmul_params / 1e6:.1f}M matmul params")


if __name__ == "__main__":
    main()
