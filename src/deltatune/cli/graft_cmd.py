"""``deltatune graft --base B --finetuned FT --out DIR [--data EVAL]``: skill localisation by grafting.

Keeps the top-k of |θ_ft − θ₀| per target matrix at each density and reports what is kept
(JSON + PNG), then saves the graft at one density as a sparse delta (see :mod:`deltatune.graft`).
"""
from __future__ import annotations

import json


def _densities(text: str) -> list[float]:
    import argparse

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], e.g. 0.01,0.05,0.1; got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("graft", help="graft the largest weight changes of a fine-tuned model onto its base: accuracy kept vs density, sparse delta")
    p.add_argument("--base", required=True, help="base model (HF directory, hub id or alias)")
    p.add_argument("--finetuned", required=True, help="fine-tuned model of the same architecture (HF directory)")
    p.add_argument("--out", required=True, help="output directory (written atomically): graft_report.json, graft_curve.png, delta/")
    p.add_argument("--densities", type=_densities, default=None, help="comma-separated densities to evaluate (default 0.001,0.01,0.05,0.1,0.25)")
    p.add_argument("--save-density", type=float, default=None,
                   help="density of the saved delta (default: the smallest evaluated density keeping --keep of the fine-tuned metric)")
    p.add_argument("--keep", type=float, default=0.99, help="share of the fine-tuned metric the default saved density must keep")
    p.add_argument("--data", help="eval data file (JSONL / CSV / TSV …) for the metric at each density")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification"], default="causal-lm")
    p.add_argument("--num-labels", type=int, default=None, help="sequence classification: number of labels (default: the fine-tuned model's)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate on at most this many examples")
    p.add_argument("--targets", default="all-linear", help="which matrices are grafted (target pattern; default all-linear)")
    p.add_argument("--modules-to-save", nargs="*", default=None,
                   help="modules copied in full from the fine-tuned model (default: the classification head for sequence classification)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.graft import DEFAULT_DENSITIES, graft_report

    report = graft_report(args.base, args.finetuned, args.out, densities=args.densities or list(DEFAULT_DENSITIES), data=args.data, task=args.task,
                          num_labels=args.num_labels, max_examples=args.max_examples, targets=args.targets, save_density=args.save_density,
                          keep=args.keep, modules_to_save=args.modules_to_save, log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"grafted {args.finetuned} onto {args.base}: saved density {report['saved_density']:g} -> {report['delta']} "
              f"(report {args.out}/graft_report.json, plot {report['plot']})")
    return 0
