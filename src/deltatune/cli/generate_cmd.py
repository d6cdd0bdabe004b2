"""``deltatune generate``: text from a base model, optionally with a delta, streamed to the terminal."""
from __future__ import annotations

import sys


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
    p.set_defaults(run=run)


def run(args) -> int:
    import deltatune
    from deltatune.generation import SamplingParams, generate_text

    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    model = deltatune.load_model(args.model, task="causal-lm")
    if args.adapter:
        model = deltatune.load_delta(model, args.adapter)
    tokenizer = deltatune.load_tokenizer(args.model)
    chat = args.chat is not None
    text = generate_text(model, tokenizer, args.chat if chat else args.prompt, sampling, chat=chat, stream=not args.no_stream)
    if args.no_stream:
        sys.stdout.write(text + "\n")
    return 0
