"""Multi-adapter serving throughput on SmolLM2-135M: deltatune's engine vs PEFT's mixed batch vs plain transformers.

A batch of ``--batch`` requests (prompts of 32–64 tokens from a fixed text, ``--new`` new tokens,
greedy, EOS ignored so every system generates the same number of tokens), request i using
adapter i mod N (LoRA r=16 on every attention and MLP projection, random non-zero weights), for
each N in ``--ns``. Reported: generated tokens/s of

- ``hf_base``: ``model.generate`` on the base model, left-padded batch, no adapters;
- ``peft``: PEFT's mixed-adapter batch, ``generate(..., adapter_names=[...])``;
- ``engine``: ``deltatune.serve.Engine.generate`` (N = 0: no adapter on any request), adapters kept in the
  model's dtype; ``engine_bf16``: the same with ``lora_dtype="bfloat16"`` (``--lora-dtypes``).

Each timing is the best (and the median) of ``--repeats`` rounds after one warm-up (the engine's warm-up also
loads the adapters); every round times every system once, in turn. ``--load-test C,R``
additionally starts the HTTP server on 127.0.0.1 and sends R streaming requests from C concurrent
clients over ``--load-adapters`` adapters (resident slots: 32), reporting errors, p50/p99 latency and tokens/s.

    .venv/bin/python bench/serve_multi_lora.py --threads 2 --out /tmp/serve.json
    .venv/bin/python bench/serve_multi_lora.py --batch 8 --new 8 --ns 1,8 --load-test 8,32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune  # noqa: E402
from machine import machine_info  # noqa: E402  (bench/machine.py: python puts the script's folder on sys.path)
from deltatune.serve import Engine, SamplingParams  # noqa: E402
from deltatune.serve.local import local_server  # noqa: E402

TEXT = ("The history of science is the study of the development of science and scientific knowledge, including both the natural "
        "and social sciences. Science is a body of empirical, theoretical, and practical knowledge about the natural world, "
        "produced by scientists who emphasize the observation, explanation, and prediction of real-world phenomena. ") * 4


def make_adapters(model_name: str, root: Path, n: int, rank: int) -> list[str]:
    """n LoRA adapters on all projections, random weights, each its own directory.

    The first is written by deltatune (attach + save_delta); the others copy its config files and
    get fresh random tensors of the same names and shapes — the same files, ~20x faster than an
    attach/save round per adapter, which matters for 1,000 of them.
    """
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    dm = deltatune.DeltaModel.of(deltatune.load_model(model_name))
    first = "a0000"
    dm.attach(deltatune.LoraConfig(r=rank, alpha=2 * rank, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), name=first)
    dm.save_delta(str(root / first), first)
    template = root / first
    weights = next(template.glob("*.safetensors"))
    shapes = {k: v.shape for k, v in load_file(str(weights)).items()}
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        name = f"a{i:04d}"
        out = root / name
        out.mkdir(exist_ok=True)
        for f in template.iterdir():
            if f.suffix != ".safetensors" and i:
                shutil.copyfile(f, out / f.name)
        save_file({k: torch.randn(shape, generator=g) * 0.01 for k, shape in shapes.items()}, str(out / weights.name))
        names.append(name)
    return names


def make_prompts(tokenizer, batch: int) -> list[list[int]]:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    prompts = []
    for _ in range(batch):
        n = rng.randint(32, 64)
        start = rng.randint(0, len(ids) - n)
        prompts.append(ids[start: start + n])
    return prompts


def interleaved_times(systems: dict, repeats: int) -> dict[str, list[float]]:
    """Every round's time per system over ``repeats`` rounds, each round timing every system once in turn
    (after one warm-up call each). Interleaving puts a slow spell of a shared machine into one
    round of every system instead of into all repeats of one system."""
    for fn in systems.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in systems}
    for _ in range(repeats):
        for key, fn in systems.items():
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t)
    return times


def hf_generate(model, tokenizer, prompts, new, adapter_names=None):
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad, **kwargs)
    assert out.shape[1] == width + new


def rss_mb() -> float:
    from deltatune.utils.memory import proc_status_mb

    return proc_status_mb("VmRSS")


class RssSampler(threading.Thread):
    """The process's resident memory every ``every`` seconds, while the load test runs: its maximum."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.max_mb, self.samples, self._halt = every, rss_mb(), [], threading.Event()

    def run(self):
        while not self._halt.is_set():
            value = rss_mb()
            self.max_mb = max(self.max_mb, value)
            self.samples.append(value)
            time.sleep(self.every)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.max_mb


def load_test(engine: Engine, names: list[str], clients: int, requests: int, new: int) -> dict:
    from deltatune.serve.api import create_app

    server = contextlib.ExitStack()  # the server runs until server.close() below
    port = server.enter_context(local_server(create_app(engine), log_level="warning"))
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(i: int):
        body = {"model": names[i % len(names)], "prompt": TEXT[: 200 + i % 50], "max_tokens": new, "temperature": 0, "stream": True}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    if line.startswith(b'data: {"error"'):
                        return time.perf_counter() - t, line.decode().strip()
                    if line.startswith(b"data: [DONE]"):
                        return time.perf_counter() - t, None
        except Exception as err:  # counted, not raised: the report says how many failed
            return time.perf_counter() - t, repr(err)
        return time.perf_counter() - t, "stream ended without [DONE]"

    # Memory bound: the engine's pool and KV cache are allocated up front, so after one request per
    # client has warmed the server up, serving every other adapter must not grow the process.
    with ThreadPoolExecutor(clients) as ex:
        warm = list(ex.map(one, range(min(clients, requests))))
    rss_start, warm_tokens = rss_mb(), engine.metrics()["generated_tokens"]
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = warm + list(ex.map(one, range(len(warm), requests)))
    wall = time.perf_counter() - t0
    rss_max = sampler.stop()
    server.close()
    lat = sorted(r[0] for r in results[len(warm):] or results)
    errors = [r[1] for r in results if r[1]]
    m = engine.metrics()
    return {"clients": clients, "requests": requests, "adapters": len(names), "errors": len(errors), "first_error": errors[0] if errors else None,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "wall_s": wall,
            "generated_tokens_per_s": (m["generated_tokens"] - warm_tokens) / wall, "adapter_loads": m["adapter_loads"], "adapter_evictions": m["adapter_evictions"],
            "resident_adapters": m["resident_adapters"], "pool_slots_mb": round(engine.pool.nbytes() / 2**20, 1) if engine.pool else 0,
            "rss_after_warmup_mb": round(rss_start, 1), "rss_max_mb": round(rss_max, 1), "rss_growth_mb": round(rss_max - rss_start, 1),
            "rss_last_mb": round(sampler.samples[-1] if sampler.samples else rss_start, 1)}


ENGINE_KEYS = {"auto": "engine", "float32": "engine_fp32", "bfloat16": "engine_bf16", "float16": "engine_fp16"}


def ratios(tps: dict[str, float], n: int) -> dict[str, float]:
    """The issue's three targets per engine variant: N=n vs PEFT's N=n, N=n vs its own N=0, N=0 vs transformers."""
    out = {}
    for key in ENGINE_KEYS.values():
        if f"{key}_N{n}" not in tps:
            continue
        if f"peft_N{n}" in tps:
            out[f"{key}_N{n} / peft_N{n}"] = round(tps[f"{key}_N{n}"] / tps[f"peft_N{n}"], 3)
        out[f"{key}_N{n} / {key}_N0"] = round(tps[f"{key}_N{n}"] / tps[f"{key}_N0"], 3)
        if key != "engine" and "engine_N0" in tps:  # like with like: against the default (model-dtype) engine's N=0 too
            out[f"{key}_N{n} / engine_N0"] = round(tps[f"{key}_N{n}"] / tps["engine_N0"], 3)
        out[f"{key}_N0 / hf_base"] = round(tps[f"{key}_N0"] / tps["hf_base"], 3)
    return out


def paired_ratios(times: dict[str, list[float]], n: int) -> dict[str, float]:
    """The same ratios from each round's own two timings, median over rounds: on a machine whose speed
    drifts, timings taken seconds apart in one round share the drift."""
    rounds = [ratios({k: 1.0 / v[i] for k, v in times.items()}, n) for i in range(len(next(iter(times.values()))))]
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--ns", default="1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the models run (e.g. cuda); the targets are for the CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-dtypes", default="auto,bfloat16",
                    help="adapter storage of the engines compared (auto: the model's dtype); engine_N* is auto, engine_bf16_N* bfloat16")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--load-test", help="C,R: C concurrent streaming clients sending R requests in all")
    ap.add_argument("--load-adapters", type=int, default=64)
    ap.add_argument("--load-rank", type=int, help="rank of the load test's adapters (default: --rank); a smaller one keeps 1,000 on disk small")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.ns.split(",")]
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        return run(args, ns, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 1,000 adapters are gigabytes


def run(args, ns: list[int], root: Path) -> int:
    names = make_adapters(args.model, root / "throughput", max(ns), args.rank)
    root = root / "throughput"
    tokenizer = deltatune.load_tokenizer(args.model)
    prompts = make_prompts(tokenizer, args.batch)
    tokens = args.batch * args.new
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine_info(), "torch_threads": torch.get_num_threads(), "tokens_per_s": {}}
    tps = results["tokens_per_s"]

    def load():
        return deltatune.load_model(args.model).to(args.device)

    systems: dict[str, object] = {}  # key → a function that generates the whole batch once
    base = load().eval()
    systems["hf_base"] = lambda: hf_generate(base, tokenizer, prompts, args.new)
    greedy = SamplingParams(max_tokens=args.new, ignore_eos=True)
    engines = []
    for dtype in args.lora_dtypes.split(","):
        engine = Engine(load(), root, tokenizer, max_batch=args.batch, max_len=64 + args.new + 8,
                        lora_slots=max(32, max(ns)), max_lora_rank=args.rank, prefill_budget=4096, lora_dtype=dtype)
        engines.append(engine)
        key = ENGINE_KEYS[dtype]
        systems[f"{key}_N0"] = lambda engine=engine: engine.generate(prompts, [None] * args.batch, greedy)
        for n in ns:
            ads = [names[i % n] for i in range(args.batch)]
            systems[f"{key}_N{n}"] = lambda ads=ads, engine=engine: engine.generate(prompts, ads, greedy)
    if not args.skip_peft:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(load(), str(root / names[0]), adapter_name=names[0])
        for name in names[1: max(ns)]:
            peft.load_adapter(str(root / name), adapter_name=name)
        peft.eval()
        for n in ns:
            ads = [names[i % n] for i in range(args.batch)]
            systems[f"peft_N{n}"] = lambda ads=ads: hf_generate(peft, tokenizer, prompts, args.new, ads)
    median = results["tokens_per_s_median"] = {}
    times = results["seconds_per_round"] = interleaved_times(systems, args.repeats)
    for key, seconds in times.items():
        tps[key] = round(tokens / min(seconds), 1)
        median[key] = round(tokens / statistics.median(seconds), 1)
        print(f"{key:>16}: {tps[key]:8.1f} tokens/s best, {median[key]:8.1f} median", flush=True)
    results["ratios"], results["ratios_median"] = ratios(tps, max(ns)), ratios(median, max(ns))
    results["ratios_paired"] = paired_ratios(times, max(ns))
    for key, value in results["ratios"].items():
        print(f"{key:>32}: {value:.2f} best, {results['ratios_median'][key]:.2f} median, "
              f"{results['ratios_paired'][key]:.2f} median of the rounds' own ratios", flush=True)

    if args.load_test:
        clients, requests = (int(x) for x in args.load_test.split(","))
        for engine in engines:
            engine.close()
        load_rank = args.load_rank or args.rank
        load_root = root.parent / "load"
        load_names = make_adapters(args.model, load_root, args.load_adapters, load_rank)
        served = Engine(load(), load_root, tokenizer, max_batch=min(clients, 32), max_len=256, lora_slots=32,
                        max_lora_rank=load_rank)
        results["load_test"] = load_test(served, load_names, clients, requests, args.new)
        print(json.dumps(results["load_test"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
