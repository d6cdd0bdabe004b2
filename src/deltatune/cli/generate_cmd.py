"""``deltatune generate``: text from a base model, optionally with a delta, streamed to the terminal.

``--proxy SMALL_BASE:SMALL_TUNED`` steers the model by logit arithmetic (see :mod:`deltatune.proxy`):
``SMALL_TUNED`` is a model, or a delta directory that is applied to ``SMALL_BASE``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from deltatune.utils.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model (+ an optional delta)")
    p.add_argument("--model", required=True, help="alias, HF directory, .gguf file or hub id")
    p.add_argument("--adapter", help="a delta directory (deltatune or PEFT format)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="raw text prompt")
    group.add_argument("--chat", help="a user message, rendered with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
    p.add_argument("--proxy", metavar="SMALL_BASE:SMALL_TUNED",
                   help="logit arithmetic: model + w·(small_tuned − small_base); SMALL_TUNED may be a delta directory for SMALL_BASE")
    p.add_argument("--proxy-weight", type=float, default=None, help="w in the logit arithmetic (default 1.0)")
    p.set_defaults(run=run)


def parse_proxy(spec: str) -> tuple[str, str]:
    small_base, sep, small_tuned = spec.partition(":")
    if not sep or not small_base or not small_tuned:
        raise ConfigError(f"--proxy {spec!r}: expected SMALL_BASE:SMALL_TUNED (a model and a tuned model or a delta directory for it)")
    return small_base, small_tuned


def is_delta_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "adapter_config.json").is_file() or (p / "deltatune.json").is_file())


def run(args) -> int:
    import deltatune
    from deltatune.generation import SamplingParams, generate_text

    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    if args.proxy_weight is not None and not args.proxy:
        raise ConfigError("--proxy-weight needs --proxy SMALL_BASE:SMALL_TUNED")
    proxy = parse_proxy(args.proxy) if args.proxy else None
    model = deltatune.load_model(args.model, task="causal-lm")
    if args.adapter:
        model = deltatune.load_delta(model, args.adapter)
    tokenizer = deltatune.load_tokenizer(args.model)
    chat = args.chat is not None
    prompt = args.chat if chat else args.prompt
    if proxy is None:
        text = generate_text(model, tokenizer, prompt, sampling, chat=chat, stream=not args.no_stream)
    else:
        text = _run_proxy(model, tokenizer, args.model, proxy, 1.0 if args.proxy_weight is None else args.proxy_weight, prompt, sampling, chat, not args.no_stream)
    if args.no_stream:
        sys.stdout.write(text + "\n")
    return 0


def _run_proxy(big, tokenizer, big_name: str, proxy: tuple[str, str], weight: float, prompt: str, sampling, chat: bool, stream: bool) -> str:
    import deltatune
    from deltatune.proxy import check_shared_vocab, proxy_generate_text

    base_name, tuned_name = proxy
    tokenizers = {f"model {big_name!r}": tokenizer, f"small base {base_name!r}": deltatune.load_tokenizer(base_name)}
    if not is_delta_dir(tuned_name):
        tokenizers[f"small tuned {tuned_name!r}"] = deltatune.load_tokenizer(tuned_name)
    check_shared_vocab(tokenizers)  # before loading the small models' weights
    small_base = deltatune.load_model(base_name, task="causal-lm")
    if is_delta_dir(tuned_name):
        # One small model in memory: the plain base runs with the delta disabled (see deltatune.proxy).
        small_tuned = deltatune.load_delta(small_base, tuned_name)
    else:
        small_tuned = deltatune.load_model(tuned_name, task="causal-lm")
    return proxy_generate_text(big, small_base, small_tuned, tokenizer, prompt, weight, sampling, chat=chat, stream=stream)
