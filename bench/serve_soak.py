"""Soak run of ``deltatune serve``: many streaming clients over hundreds of adapters, a few of them malformed.

Starts the HTTP server on 127.0.0.1 over SmolLM2-135M with ``--adapters`` LoRA adapters on disk
(``--slots`` resident at once), ``--malformed`` of which are broken in different ways (NaN values,
a tensor of the wrong shape, a truncated file, integer weights, an unknown method in the config).
``--clients`` concurrent streaming clients send ``--requests`` greedy requests in all, each for a
random adapter. The run checks what a user of the server depends on:

- only the requests for malformed adapters fail, each with a 400-class error event that names no
  server path, and every other request ends with ``data: [DONE]``;
- no request hangs (each has ``--timeout``);
- memory stays bounded: RSS after the warm-up, its maximum during the run and at the end.

It reports p50/p99 latency, tokens/s and the CPU model, and writes ``--out`` (JSON, atomically).

    .venv/bin/python bench/serve_soak.py --out bench/results/serve_soak.json
    .venv/bin/python bench/serve_soak.py --clients 8 --requests 40 --adapters 20 --malformed 2   # a quick check
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
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import deltatune  # noqa: E402
from deltatune.serve import Engine  # noqa: E402
from deltatune.serve.local import local_server  # noqa: E402
from deltatune.utils.io import write_text_atomic  # noqa: E402
from machine import machine_info  # noqa: E402  (bench/ is on sys.path when this script runs)
from serve_multi_lora import TEXT, RssSampler, make_adapters, rss_mb  # noqa: E402

WEIGHTS = "adapter_model.safetensors"


def _edit_tensors(path: Path, change) -> None:
    tensors = load_file(str(path / WEIGHTS))
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path / WEIGHTS))


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CORRUPTIONS = {
    "nan": lambda p: _edit_tensors(p, _nan),
    "shape": lambda p: _edit_tensors(p, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)),
    "truncated": lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:200]),
    "int": lambda p: _edit_tensors(p, lambda t: t.to(torch.int32)),
    "method": lambda p: (p / "deltatune.json").write_text((p / "deltatune.json").read_text().replace('"method": "lora"', '"method": "nope"')),
}


def corrupt(root: Path, names: list[str], count: int, rng: random.Random) -> dict[str, str]:
    """Break ``count`` adapters, cycling through the kinds of damage; returns name → kind."""
    broken = {}
    for i, name in enumerate(rng.sample(names, count)):
        kind = list(CORRUPTIONS)[i % len(CORRUPTIONS)]
        CORRUPTIONS[kind](root / name)
        broken[name] = kind
    return broken


def stream_one(url: str, model: str, prompt: str, new: int, timeout: float) -> tuple[float, str | None, int]:
    """(seconds, error or None, text events) of one streaming request; never raises."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t, events = time.perf_counter(), 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                if line.startswith(b'data: {"error"'):
                    return time.perf_counter() - t, line.decode().strip(), events
                if line.startswith(b"data: [DONE]"):
                    return time.perf_counter() - t, None, events
                events += line.startswith(b"data: ")
    except urllib.error.HTTPError as err:
        return time.perf_counter() - t, f"HTTP {err.code}: {err.read().decode()[:300]}", events
    except Exception as err:  # counted, not raised: the report says how many failed and how
        return time.perf_counter() - t, repr(err), events
    return time.perf_counter() - t, "stream ended without [DONE]", events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--malformed", type=int, default=5)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a request counts as hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not 0 <= args.malformed < args.adapters or min(args.clients, args.requests, args.slots, args.rank, args.new) < 1:
        ap.error("need 0 <= --malformed < --adapters and positive --clients/--requests/--slots/--rank/--new")
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return 0 if result["verdict"]["only_malformed_failed"] and result["verdict"]["no_hang"] else 1


def run(args, root: Path) -> dict:
    from deltatune.serve.api import create_app

    rng = random.Random(args.seed)
    names = make_adapters(args.model, root, args.adapters, args.rank)
    broken = corrupt(root, names, args.malformed, rng)
    engine = Engine(deltatune.load_model(args.model), root, deltatune.load_tokenizer(args.model), max_batch=min(args.clients, 32), max_len=256,
                    lora_slots=args.slots, max_lora_rank=args.rank)
    server = contextlib.ExitStack()  # the server runs until server.close() below
    url = f"http://127.0.0.1:{server.enter_context(local_server(create_app(engine)))}/v1/completions"
    plan = [(rng.choice(names), TEXT[: 120 + rng.randrange(120)]) for _ in range(args.requests)]

    def one(i: int):
        model, prompt = plan[i]
        return (model, *stream_one(url, model, prompt, args.new, args.timeout))

    # After one request per client has warmed the server up, the pool and KV cache are allocated:
    # memory must stay flat however many adapters pass through the slots.
    warm_n = min(args.clients, args.requests)
    with ThreadPoolExecutor(args.clients) as ex:
        results = list(ex.map(one, range(warm_n)))
    rss_start, warm_tokens = rss_mb(), engine.metrics()["generated_tokens"]
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as ex:
        results += list(ex.map(one, range(warm_n, args.requests)))
    wall = time.perf_counter() - t0
    rss_max = sampler.stop()
    metrics = engine.metrics()
    server.close()

    good = [r for r in results if r[0] not in broken]
    bad = [r for r in results if r[0] in broken]
    good_errors = [r[2] for r in good if r[2]]
    bad_unfailed = [r[0] for r in bad if not r[2]]
    leaked = [r[2] for r in bad if r[2] and str(root) in r[2]]
    hung = [r for r in results if r[2] and ("timed out" in r[2] or "TimeoutError" in r[2])]
    lat = sorted(r[1] for r in good[warm_n:] or good)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info(),
        "malformed": broken,
        "requests": len(results), "requests_for_malformed": len(bad),
        "errors_for_good_adapters": len(good_errors), "first_good_error": good_errors[0] if good_errors else None,
        "malformed_requests_that_succeeded": len(bad_unfailed),
        "first_malformed_error": next((r[2] for r in bad if r[2]), None),
        "errors_revealing_server_paths": len(leaked),
        "hung_requests": len(hung),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "wall_s": round(wall, 1),
        "generated_tokens_per_s": round((metrics["generated_tokens"] - warm_tokens) / wall, 1),
        "adapter_loads": metrics["adapter_loads"], "adapter_evictions": metrics["adapter_evictions"], "engine_errors": metrics["errors"],
        "rss_after_warmup_mb": round(rss_start, 1), "rss_max_mb": round(rss_max, 1), "rss_growth_mb": round(rss_max - rss_start, 1),
        "rss_last_mb": round(sampler.samples[-1] if sampler.samples else rss_start, 1),
        "verdict": {"only_malformed_failed": not good_errors and not bad_unfailed and not leaked, "no_hang": not hung},
    }


if __name__ == "__main__":
    sys.exit(main())
