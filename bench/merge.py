"""The same TIES merge of three SmolLM2-135M checkpoints with deltatune and with mergekit.

    python bench/merge.py [--density 0.5] [--workdir /tmp/deltatune-bench-merge]

The three "fine-tunes" are the base plus seeded Gaussian perturbations (σ = 1e-3 × the tensor's
std, a different seed each), saved as HF directories once and reused. Each merge runs in its own
process (mergekit with .venv-peers/bin/python, whose transformers 4.x clashes with ours), measured
by a wrapper that reports the child's wall time, CPU time (user + system: steadier than wall time
on a shared machine) and peak RSS (ru_maxrss). Then prints both, and
the max |difference| of the merged weights and of the logits on a fixed prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from machine import machine_info  # bench/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, 'cpu_seconds': u.ru_utime + u.ru_stime, "
    "'peak_rss_mb': u.ru_maxrss / 1024}))"
)


def make_checkpoints(work: Path, n: int = 3) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import load_file, save_file

    from deltatune.algebra.merge import copy_model_files
    from deltatune.models.load import resolve_source

    base = Path(resolve_source("smollm2-135m-instruct")[0])
    fts = []
    for i in range(n):
        out = work / f"ft{i}"
        if not (out / "model.safetensors").is_file():
            g = torch.Generator().manual_seed(1000 + i)
            tensors = load_file(str(base / "model.safetensors"))
            for t in tensors.values():
                t.add_(torch.randn(t.shape, generator=g) * (1e-3 * float(t.float().std()) + 1e-6))
            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
            copy_model_files(base, out)
            del tensors
        fts.append(out)
    return base, fts


def measured(cmd: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {result['rc']}:\n{r.stderr[-3000:]}")
    return result


def compare(a: Path, b: Path, base: Path) -> dict:
    import torch

    from deltatune.algebra.stream import TensorFile, checkpoint_files

    fa, fb = TensorFile(checkpoint_files(a), str(a)), TensorFile(checkpoint_files(b), str(b))
    missing = sorted(set(fa.keys()) ^ set(fb.keys()))
    diff = max(float((fa.get(k).float() - fb.get(k).float()).abs().max()) for k in fa.keys() if k in fb.infos)
    import deltatune

    ids = torch.tensor([[1, 504, 3458, 314, 260, 1010, 30, 2]])
    with torch.no_grad():
        la = deltatune.load_model(a)(input_ids=ids).logits
        lb = deltatune.load_model(b)(input_ids=ids).logits
        lbase = deltatune.load_model(base)(input_ids=ids).logits
    return {"max_abs_weight_diff": diff, "max_abs_logit_diff": float((la - lb).abs().max()), "keys_only_in_one": missing,
            "logit_change_vs_base": float((la - lbase).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--workdir", default="/tmp/deltatune-bench-merge")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results (with the machine they ran on) as JSON here, atomically")
    args = ap.parse_args()
    if not PEERS_PY.exists():
        ap.error(f"{PEERS_PY} is missing: run 'make peers' first (mergekit lives in its own venv)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, fts = make_checkpoints(work)
    weights = [1.0, 0.7, 0.4]

    import yaml

    ours = work / "ours.yaml"
    ours.write_text(yaml.safe_dump({
        "base": str(base), "method": "ties", "parameters": {"density": args.density},
        "inputs": [{"path": str(p), "weight": w} for p, w in zip(fts, weights)], "output": {"path": str(work / "out-deltatune"), "dtype": "float32"},
    }))
    theirs = work / "mergekit.yaml"
    theirs.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"normalize": True, "int8_mask": False},
        "models": [{"model": str(p), "parameters": {"weight": w, "density": args.density}} for p, w in zip(fts, weights)],
    }))
    env_threads = f"OMP_NUM_THREADS={args.threads}"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = {
        "mergekit": measured([str(PEERS_PY), "-m", "mergekit.scripts.run_yaml", str(theirs), str(work / "out-mergekit"), "--quiet", "--no-copy-tokenizer",
                              "-j", str(args.threads)]),
        "deltatune": measured([str(ROOT / ".venv" / "bin" / "python"), "-m", "deltatune", "merge", str(ours), "--json"]),
    }
    results["compare"] = compare(work / "out-deltatune", work / "out-mergekit", base)
    d, m = results["deltatune"], results["mergekit"]
    print(f"TIES merge of 3 x SmolLM2-135M (fp32, density {args.density}), {env_threads}")
    print(f"{'':10s} {'wall':>8s} {'CPU':>8s} {'peak RSS':>10s}")
    for name in ("deltatune", "mergekit"):
        r = results[name]
        print(f"{name:10s} {r['seconds']:7.1f}s {r['cpu_seconds']:7.1f}s {r['peak_rss_mb']:8.0f} MB")
    print(f"deltatune / mergekit: wall {d['seconds'] / m['seconds']:.2f}x, CPU {d['cpu_seconds'] / m['cpu_seconds']:.2f}x, "
          f"peak RSS {d['peak_rss_mb'] / m['peak_rss_mb']:.2f}x")
    c = results["compare"]
    print(f"max |weight diff| {c['max_abs_weight_diff']:.3g}, max |logit diff| {c['max_abs_logit_diff']:.3g} "
          f"(the merge moves logits by up to {c['logit_change_vs_base']:.3g} from the base)")
    results.update(config={"density": args.density, "weights": weights, "threads": args.threads}, machine=machine_info())
    print(json.dumps(results))
    if args.out:
        from deltatune.utils.io import write_json_atomic

        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
