"""``deltatune eval``: score a model (+ a delta) on a data file — loss/perplexity, accuracy, exact match."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model, optionally with a delta, on a data file")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="a delta directory (deltatune or PEFT format)")
    p.add_argument("--data", required=True, help="JSONL / JSON / CSV / TSV / Parquet file")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification"], default="causal-lm")
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--metric", choices=["auto", "loss", "accuracy", "exact_match"], default="auto",
                   help="auto: loss/perplexity for LM, accuracy + macro-F1 for classification")
    p.add_argument("--format", default="auto", choices=["auto", "text", "instruction", "chat", "classification"])
    p.add_argument("--template", default="auto", choices=["auto", "chat", "alpaca", "plain"])
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import evaluate, format_metrics
    from deltatune.train.setup import build_model, prepare_data

    recipe = load_recipe(None, default={
        "model": {"name": args.model, "task": args.task, "num_labels": args.num_labels},
        "delta": None,
        "data": {"path": args.data, "eval_path": args.data, "max_eval_examples": args.max_examples, "format": args.format, "template": args.template, "max_examples": args.max_examples,
                 "shuffle": False},
        "eval": {"metric": args.metric, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "train": {"progress": not args.json},
    })
    import deltatune

    tokenizer = deltatune.load_tokenizer(args.model)
    data = prepare_data(recipe, tokenizer, run_dir=None, write=False)
    model = build_model(recipe, data.report.num_labels)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.adapter:
        model = deltatune.load_delta(model, args.adapter)
    from deltatune.train.objective import CausalLMObjective, ClassificationObjective

    objective = ClassificationObjective(model) if args.task == "sequence-classification" else CausalLMObjective(model)
    metrics = evaluate(model, objective, data, recipe, tokenizer)
    metrics["n"] = len(data.eval)
    print(json.dumps(metrics) if args.json else f"{args.data}: " + format_metrics(metrics))
    return 0
