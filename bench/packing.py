"""Gain of sequence packing on a real instruction set: real (non-padding) tokens per second.

    python bench/packing.py [--steps 15] [--data ../shared/data/alpaca_en_demo/alpaca_en_demo.json]

Runs the same LoRA recipe on SmolLM2-135M-Instruct twice in one process — padded batches and
packed rows — with the same number of rows per step, and reads tokens/s (non-padding tokens
only) and the loss from each run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_en_demo" / "alpaca_en_demo.json"))
    args = parser.parse_args()

    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train

    out = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    rows = {}
    for packing in (False, True):
        name = "packed" if packing else "padded"
        recipe = load_recipe(ROOT / "recipes" / "smollm2_lora_instruct.yaml", [
            f"data.path={args.data}", f"data.packing={str(packing).lower()}", "data.max_length=512", "data.eval_fraction=0.0",
            f"train.max_steps={args.steps}", "train.batch_size=4", "train.grad_accum=1", "train.log_every=1",
            "train.eval_every=null", "train.save_every=null", "train.progress=false", f"output.dir={out}", f"output.name={name}",
        ])
        train(recipe)
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "tokens_per_s" in m][1:]  # the first step pays one-time costs
        rows[name] = statistics.median(m["tokens_per_s"] for m in steps)
    print(f"\nreal tokens/s, SmolLM2-135M LoRA r=16, 4 rows x <=512 tokens per step, {args.steps} steps, median")
    for name, tps in rows.items():
        print(f"{name:<8}{tps:>10.1f}")
    print(f"packing gain: {rows['packed'] / rows['padded']:.2f}x")


if __name__ == "__main__":
    main()
