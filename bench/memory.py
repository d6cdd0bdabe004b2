"""Memory of full fine-tuning SmolLM2-135M (fp32, seq 256, batch 4) per optimizer, one fresh process each.

Every run sees the same packed rows of ``../shared/data/alpaca_en_demo`` (instruction + input +
output, tokenised, concatenated, cut into rows of ``--seq`` tokens) in the same order, trains
every weight for ``--steps`` steps with ``deltatune.optim``'s optimizer (the same builder the
training loop uses, so the recipe's ``optim.name`` gets exactly this) and reports:

- peak RSS of the training steps only: the kernel's high-water mark (VmHWM) is reset after the
  model and data are loaded (``/proc/self/clear_refs``), so loading transients do not count;
- optimizer-state bytes: every tensor in ``optimizer.state`` (moments, GaLore bases, AdaLomo's
  factors, Sparse MeZO's masks), the largest seen after any step (LISA's moves with its layers);
- tokens/s over steps 2..N, and the loss of the first batch before and after training;
- ratios vs AdamW's peak and vs an inference-only run (forward + loss under ``no_grad``).

``--checkpointing`` (on by default) recomputes each decoder layer's activations in backward, for
every method alike: without it the saved activations (~2 GB here) dominate every peak and hide
what an optimizer saves. ``--no-checkpointing`` measures that too.

    .venv/bin/python bench/memory.py --steps 3 --out /tmp/memory.json
    .venv/bin/python bench/memory.py --only adamw lomo --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo" / "alpaca_en_demo.json"

# optimizer → recipe ``optim`` section. Learning rates in each method's usual range for full fine-tuning.
RUNS: dict[str, dict] = {
    "adamw": {"name": "adamw", "lr": 2e-5},
    "galore": {"name": "galore", "lr": 1e-4, "galore": {"rank": 64, "update_gap": 200, "scale": 0.25}},
    # GaLore's per-layer update: gradients freed inside backward, so only the state is full model-sized no more
    "galore_layerwise": {"name": "galore", "lr": 1e-4, "galore": {"rank": 64, "update_gap": 200, "scale": 0.25, "layerwise": True}},
    "lisa": {"name": "lisa", "lr": 2e-5, "lisa": {"layers": 2, "interval": 5}},
    "lomo": {"name": "lomo", "lr": 1e-3, "max_grad_norm": 1.0},
    "adalomo": {"name": "adalomo", "lr": 1e-3},
    "mezo": {"name": "mezo", "lr": 1e-6, "mezo": {"eps": 1e-3}},
    "sparse_mezo": {"name": "sparse_mezo", "lr": 1e-6, "mezo": {"eps": 1e-3, "density": 0.25}},
}


# ---------------------------------------------------------------- worker (one process per optimizer)

def current_rss_mb() -> float:
    from deltatune.utils.memory import proc_status_mb

    return proc_status_mb("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    from deltatune.utils.memory import proc_status_mb

    peak = proc_status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # NaN off Linux


class AnonSampler:
    """Peak *anonymous* resident memory (RssAnon: tensors, heap), sampled every ``every`` seconds.

    VmHWM also counts file-backed pages (libtorch's code), which this VM's kernel pages out and back
    in on its own schedule (DAMON ``pageout``): with mmapped weights the same run's VmHWM moved by up
    to ±150 MB between repeats. RssAnon is what the run allocates (the weights are copied into
    anonymous memory first, see ``worker``); a spike shorter than ``every`` s can be missed.
    """

    def __init__(self, every: float = 0.002):
        import threading

        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float:
        from deltatune.utils.memory import proc_status_mb

        return proc_status_mb("RssAnon")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.every)

    def start(self) -> "AnonSampler":
        self.peak = self.read()
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.read())


def packed_rows(tokenizer, n_rows: int, seq: int):
    import torch

    records = json.loads(DATA.read_text())
    ids: list[int] = []
    for r in records:
        text = r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + "\n" + r["output"]
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_rows * seq:
            break
    if len(ids) < n_rows * seq:
        sys.exit(f"{DATA}: only {len(ids)} tokens, need {n_rows * seq}")
    return torch.tensor(ids[: n_rows * seq]).view(n_rows, seq)


def state_bytes(optimizer) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def worker(args) -> dict:
    import torch

    import deltatune
    from deltatune.train.config import OptimConfig
    from deltatune.train.objective import CausalLMObjective
    from deltatune.train.optim import build_optimizer
    from deltatune.utils.memory import mmap_threshold_mb, tune_allocator

    # As the training loop does (freed activations go back to the OS): the recipe's
    # train.malloc_mmap_threshold_mb if given (--mmap-threshold), else the optimizer's default.
    args.mmap_threshold = mmap_threshold_mb(args.mmap_threshold, RUNS.get(args.optimizer, {}).get("name", "adamw"))
    tune_allocator(int(args.mmap_threshold * 2**20))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = deltatune.load_tokenizer(args.model)
    model = deltatune.load_model(args.model, dtype=torch.float32)
    # The weights come mmapped from the safetensors cache: file-backed pages, which this VM's kernel
    # pages out and back in on its own schedule, and which become anonymous only where a method
    # writes them. Copied into anonymous memory, every run counts the same 538 MB of weights.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    rows = packed_rows(tokenizer, args.steps * args.batch_size, args.seq)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in rows.split(args.batch_size)]
    objective = CausalLMObjective(model, chunk_size=256)
    n_targets = args.batch_size * (args.seq - 1)

    def first_batch_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss_sum, count = objective(batches[0])
        return float(loss_sum) / int(count)

    start_loss = first_batch_loss()
    if args.checkpointing and args.optimizer != "inference":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    loaded_mb = current_rss_mb()
    peak_reset = reset_peak()
    anon = AnonSampler().start()
    times, state_max = [], 0
    if args.optimizer == "inference":
        for batch in batches:
            t0 = time.perf_counter()
            with torch.no_grad():
                objective(batch)
            times.append(time.perf_counter() - t0)
        end_loss = start_loss
    else:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        config = OptimConfig(**RUNS[args.optimizer])
        optimizer = build_optimizer(params, config, model, objective)
        model.train()

        def step_loss(i, batch):
            loss_sum, _ = objective(batch)
            return loss_sum / n_targets, loss_sum.detach()

        for batch in batches:
            t0 = time.perf_counter()
            if getattr(optimizer, "owns_step", False):
                optimizer.train_step([batch], step_loss)
            else:
                loss, _ = step_loss(0, batch)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            state_max = max(state_max, state_bytes(optimizer))
        peak, anon_peak = peak_mb(), anon.stop()
        end_loss = first_batch_loss()
        return _result(args, peak, loaded_mb, peak_reset, times, state_max, start_loss, end_loss, anon_peak)
    return _result(args, peak_mb(), loaded_mb, peak_reset, times, state_max, start_loss, end_loss, anon.stop())


def _result(args, peak, loaded_mb, peak_reset, times, state_max, start_loss, end_loss, anon_peak) -> dict:
    timed = times[1:] or times  # step 1 pays one-time costs (allocator warm-up, GaLore's first SVD)
    return {"optimizer": args.optimizer, "peak_rss_mb": peak, "peak_anon_mb": anon_peak, "loaded_rss_mb": loaded_mb, "peak_reset": peak_reset,
            "optimizer_state_mb": state_max / 2**20, "tokens_per_s": len(timed) * args.batch_size * args.seq / sum(timed),
            "step_seconds": times, "start_loss": start_loss, "end_loss": end_loss, "steps": args.steps,
            "checkpointing": args.checkpointing,
            "mmap_threshold_mb": args.mmap_threshold}


# ---------------------------------------------------------------- driver

def run_one(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--seq", str(args.seq), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--model", args.model] + ([] if args.checkpointing else ["--no-checkpointing"])
    if args.mmap_threshold is not None:
        cmd += ["--mmap-threshold", str(args.mmap_threshold)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  {name}: FAILED ({tail[0][:300]})", flush=True)
        return {"optimizer": name, "error": tail[0][:500]}
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {name}: peak {result['peak_rss_mb']:.0f} MB (anonymous {result['peak_anon_mb']:.0f} MB), state {result['optimizer_state_mb']:.0f} MB, {result['tokens_per_s']:.0f} tok/s, "
          f"loss {result['start_loss']:.3f} -> {result['end_loss']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def table(results: list[dict]) -> str:
    by = {r["optimizer"]: r for r in results if "error" not in r}
    adamw, inference = by.get("adamw"), by.get("inference")
    rows = ["| optimizer | peak RSS (MB) | vs AdamW | vs inference | peak anonymous (MB) | vs AdamW | vs inference | optimizer state (MB) | "
            "state vs AdamW | tokens/s | loss start → end | malloc mmap threshold |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ["inference", *RUNS]:
        r = by.get(name)  # the last result of a name counts
        if r is None:
            continue
        vs_adamw = f"{r['peak_rss_mb'] / adamw['peak_rss_mb']:.2f}x" if adamw else "–"
        vs_inf = f"{r['peak_rss_mb'] / inference['peak_rss_mb']:.2f}x" if inference else "–"
        state = "–" if name == "inference" else f"{r['optimizer_state_mb']:.0f}"
        state_ratio = f"{r['optimizer_state_mb'] / adamw['optimizer_state_mb']:.2f}x" if adamw and name != "inference" else "–"
        loss = f"{r['start_loss']:.4f}" if name == "inference" else f"{r['start_loss']:.4f} → {r['end_loss']:.4f}"
        anon = r.get("peak_anon_mb")
        anon_cells = (f"{anon:.0f} | {anon / adamw['peak_anon_mb']:.2f}x | " if adamw and adamw.get("peak_anon_mb") else f"{anon:.0f} | – | ") if anon else "– | – | "
        anon_cells += f"{anon / inference['peak_anon_mb']:.2f}x" if anon and inference and inference.get("peak_anon_mb") else "–"
        rows.append(f"| {name} | {r['peak_rss_mb']:.0f} | {vs_adamw} | {vs_inf} | {anon_cells} | {state} | {state_ratio} | "
                    f"{r['tokens_per_s']:.0f} | {loss} | {r.get('mmap_threshold_mb', 4):g} MiB |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=["inference", *RUNS], help="run only these (default: inference and every optimizer)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mmap-threshold", type=float, help="glibc mmap threshold in MiB for every run (a recipe's train.malloc_mmap_threshold_mb); "
                        "default: each optimizer's own (4 for adamw and inference, 2 for the others)")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--table", nargs="+", help="print the table of these result JSON files (of separate runs) and exit")
    args = parser.parse_args()
    if args.worker:
        args.optimizer = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())]))
        return
    if not DATA.is_file():
        sys.exit(f"missing {DATA}")
    results = []
    for name in args.only or ["inference", *RUNS]:
        results.append(run_one(name, args))
        if args.out:  # after every run: a long benchmark cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
