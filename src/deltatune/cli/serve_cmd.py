"""``deltatune serve``: an OpenAI-compatible server for a base model and a directory of LoRA adapters."""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from deltatune.utils.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model + many LoRA adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, help="alias, HF directory, .gguf file or hub id (a llama-family causal LM)")
    p.add_argument("--adapters", help="directory with one LoRA adapter directory per name (request 'model' = adapter name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file holding the bearer API key clients must send")
    p.add_argument("--max-batch", type=int, default=32, help="KV cache slots = requests decoded together")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per request (prompt + completion)")
    p.add_argument("--lora-slots", type=int, default=8, help="adapters resident in memory at once")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="how resident adapters are stored (auto: the model's dtype; bfloat16 halves what a decode step reads)")
    p.add_argument("--prefill-budget", type=int, default=256, help="prompt tokens prefilled per step")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting for a KV slot; more are answered 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger ones are answered 413")
    p.set_defaults(run=run)


def read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--api-key-file {path!r} does not exist")
    key = file.read_text(encoding="utf-8").strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api-key-file {path!r}: expected one key without spaces on the first line")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("deltatune serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from deltatune.serve.api import create_app
    from deltatune.serve.engine import Engine

    key = read_api_key(args.api_key_file)
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1 (got {args.max_body_bytes})")
    if key is None and not is_loopback(args.host):
        logging.getLogger("deltatune.serve").warning(
            "serving on %s without --api-key-file: anyone who can reach this address can use the server", args.host)
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters!r} is not a directory")
    engine = Engine(args.model, args.adapters, max_batch=args.max_batch, max_len=args.max_len, lora_slots=args.lora_slots,
                    max_lora_rank=args.max_lora_rank, prefill_budget=args.prefill_budget, name=args.model,
                    lora_dtype=args.lora_dtype, max_queue=args.max_queue)
    uvicorn.run(create_app(engine, key, max_body_bytes=args.max_body_bytes), host=args.host, port=args.port, log_level="warning")
    return 0
