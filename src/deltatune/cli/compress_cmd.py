"""``deltatune compress ADAPTER --density 0.1 --out DIR``: ComPEFT compression of a delta."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a delta: keep the top-k%% entries, ternarise to sign x scale, store packed (ComPEFT)")
    p.add_argument("adapter", help="a delta directory (deltatune or PEFT files)")
    p.add_argument("--density", type=float, required=True, help="share of entries kept per tensor, in (0, 1]")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--no-ternary", action="store_true", help="keep the exact values of the kept entries")
    p.add_argument("--alpha", type=float, default=1.0, help="multiplier of the per-tensor scale (mean |kept entry|)")
    p.add_argument("--model", help="base model, to report accuracy kept on --data")
    p.add_argument("--data", help="eval data file (JSONL / CSV / TSV …) to report the metric before and after")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification"], default="causal-lm")
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.algebra.compress import compress_adapter
    from deltatune.utils.errors import ConfigError

    if bool(args.model) != bool(args.data):
        raise ConfigError("--model and --data go together (the base model and the eval set for the accuracy kept)")
    report = compress_adapter(args.adapter, args.out, args.density, ternary=not args.no_ternary, alpha=args.alpha)
    if args.data:
        from deltatune.algebra.soup import evaluate_model_dir

        for key, path in (("before", args.adapter), ("after", args.out)):
            report[f"metrics_{key}"] = evaluate_model_dir(args.model, args.data, args.task, args.num_labels, args.max_examples, adapter=path)
        main = "accuracy" if args.task == "sequence-classification" else "loss"
        before, after = report["metrics_before"][main], report["metrics_after"][main]
        report["kept"] = {"metric": main, "before": before, "after": after, "ratio": after / before if before else None}
    if args.json:
        print(json.dumps(report))
    else:
        line = f"compressed {args.adapter} -> {args.out}: {report['bytes_before']:,} -> {report['bytes_after']:,} bytes (size ratio {report['size_ratio']:.4f})"
        if "kept" in report:
            k = report["kept"]
            line += f"; {k['metric']} {k['before']:.4f} -> {k['after']:.4f}"
        print(line)
    return 0
