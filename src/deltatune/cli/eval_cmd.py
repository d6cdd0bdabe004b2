"""``deltatune eval``: score a model (+ a delta) on a data file, next to its base — task metrics,
retention on general text, calibration, weight-space diagnostics and the run's cost ledger."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune.evaluation.calibration import answer_token_confidences, classifier_confidences, expected_calibration_error, reliability_diagram
from deltatune.evaluation.diagnostics import delta_pairs, diagnose
from deltatune.evaluation.ledger import read_ledger
from deltatune.evaluation.probe_spec import run_probes
from deltatune.evaluation.retention import general_text_retention
from deltatune.utils.errors import ConfigError
from deltatune.utils.io import write_json_atomic


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model, optionally with a delta, on a data file")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="a delta directory (deltatune or PEFT format)")
    p.add_argument("--run", dest="run_dir", help="a run directory of 'deltatune train': its adapter is evaluated (unless --adapter), its cost "
                                 "ledger joins the record, and the record goes to <run>/eval.json (unless --out)")
    p.add_argument("--data", help="JSONL / JSON / CSV / TSV / Parquet file (optional with --lm-eval-task)")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification"], default="causal-lm")
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--metric", choices=["auto", "loss", "accuracy", "exact_match"], default="auto",
                   help="auto: loss/perplexity for LM, accuracy + macro-F1 for classification")
    p.add_argument("--format", default="auto", choices=["auto", "text", "instruction", "chat", "classification"])
    p.add_argument("--template", default="auto", choices=["auto", "chat", "alpaca", "plain"])
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--general-text", help="a plain-text file the run did not train on: retention = its loss minus the base's")
    p.add_argument("--general-tokens", type=int, default=16384, help="tokens of --general-text to score")
    p.add_argument("--probes", help="a YAML file of retention probes (few-shot tasks the run did not train on, cloze facts); "
                                    "see deltatune.evaluation.probe_spec")
    p.add_argument("--calibration-plot", help="write the reliability diagram (PNG) here")
    p.add_argument("--diagnostics", action="store_true", help="weight-space diagnostics of the delta (spectrum, effective rank, intruder dimensions)")
    p.add_argument("--lm-eval-task", action="append", help="also run this lm-evaluation-harness task (repeatable; needs lm-eval and the task's data)")
    p.add_argument("--lm-eval-include", help="a directory of lm-eval task YAMLs (local tasks)")
    p.add_argument("--lm-eval-limit", type=float, help="examples per lm-eval task (a fraction if < 1)")
    p.add_argument("--out", help="write the whole record as JSON here")
    p.add_argument("--json", action="store_true", help="print the record as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import evaluate
    from deltatune.train.objective import CausalLMObjective, ClassificationObjective
    from deltatune.train.setup import build_model, prepare_data

    import deltatune

    adapter, out = args.adapter, args.out
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"--run {args.run_dir!r} is not a directory")
        adapter = adapter or (str(run_dir / "adapter") if (run_dir / "adapter").is_dir() else None)
        out = out or str(run_dir / "eval.json")
    if args.diagnostics and not adapter:
        raise ConfigError("--diagnostics needs a delta: pass --adapter or --run")
    if args.data is None:
        if not args.lm_eval_task:
            raise ConfigError("deltatune eval needs --data (a data file) or --lm-eval-task (an lm-evaluation-harness task)")
        record = {"model": args.model, "adapter": adapter, "lm_eval": lm_eval_results(args, adapter)}
        return report(args, record, {}, out)
    recipe = load_recipe(None, default={
        "model": {"name": args.model, "task": args.task, "num_labels": args.num_labels},
        "delta": None,
        "data": {"path": args.data, "eval_path": args.data, "max_eval_examples": args.max_examples, "format": args.format, "template": args.template, "max_examples": args.max_examples,
                 "shuffle": False},
        "eval": {"metric": args.metric, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "train": {"progress": not args.json},
    })
    tokenizer = deltatune.load_tokenizer(args.model)
    data = prepare_data(recipe, tokenizer, run_dir=None, write=False)
    model = build_model(recipe, data.report.num_labels)
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter:
        model = deltatune.load_delta(model, adapter)
    classification = args.task == "sequence-classification"
    objective = ClassificationObjective(model) if classification else CausalLMObjective(model)
    # The task metrics stay at the top level, as --json printed them before the other sections existed.
    task = evaluate(model, objective, data, recipe, tokenizer)
    record: dict = {**task, "n": len(data.eval), "model": args.model, "adapter": adapter, "data": args.data}
    if adapter:  # the base on the same data: every number is read against it
        with model.disable():
            record["base_task"] = evaluate(model, objective, data, recipe, tokenizer)
    if args.general_text:
        record["retention"] = general_text_retention(model, tokenizer, args.general_text, max_tokens=args.general_tokens) if adapter else None
    record["calibration"] = calibration(model, tokenizer, data, classification, args.batch_size)
    if record["calibration"] is not None and args.calibration_plot:
        reliability_diagram(record["calibration"], args.calibration_plot, f"{args.model}{' + ' + Path(adapter).name if adapter else ''}")
    if args.diagnostics:
        record["diagnostics"] = diagnose(delta_pairs(model))
    if args.probes:
        if not adapter:
            raise ConfigError("--probes compares a delta with its base: pass --adapter or --run")
        record["probes"] = run_probes(model, tokenizer, args.probes)
    if args.run_dir:
        record["cost"] = read_ledger(args.run_dir)
    if args.lm_eval_task:
        record["lm_eval"] = lm_eval_results(args, adapter)
    return report(args, record, task, out)


def lm_eval_results(args, adapter: str | None) -> dict:
    from deltatune.evaluation.harness import run_tasks  # lm-eval is optional: imported only when asked for

    limit = None if args.lm_eval_limit is None else (int(args.lm_eval_limit) if args.lm_eval_limit >= 1 else args.lm_eval_limit)
    return run_tasks(args.model, [adapter] if adapter else None, args.lm_eval_task, include_path=args.lm_eval_include, limit=limit,
                     batch_size=args.batch_size)


def report(args, record: dict, task: dict, out: str | None) -> int:
    """Write and print the record: JSON with --json, else one line per section."""
    from deltatune.train.loop import format_metrics

    if out:
        write_json_atomic(out, record)
    if args.json:
        print(json.dumps(record))
    else:
        if task:
            print(f"{args.data}: " + format_metrics(task))
        if "base_task" in record:
            print(f"base:  {format_metrics(record['base_task'])}")
        if record.get("retention"):
            r = record["retention"]
            print(f"retention on {r['file']}: loss {r['loss']:.4f} vs base {r['base_loss']:.4f} (forgetting {r['forgetting']:+.4f})")
        if record.get("calibration") is not None:
            print(f"calibration: ECE {record['calibration']['ece']:.4f} over {record['calibration']['n']} predictions")
        if args.diagnostics:
            s = record["diagnostics"]["summary"]
            print(f"delta: {s['modules']} modules, {s['intruders']} intruder dimensions, mean effective rank {s['mean_effective_rank']:.2f}")
        for name, p in ((record.get("probes") or {}).get("in_context") or {}).items():
            print(f"in-context probe {name}: {100 * p['accuracy']:.1f}% vs base {100 * p['base_accuracy']:.1f}% ({p['shots']}-shot, n={p['n']})")
        knowledge = (record.get("probes") or {}).get("knowledge")
        if knowledge:
            kept = "–" if knowledge["precision_at_1"] is None else f"{100 * knowledge['precision_at_1']:.1f}%"
            print(f"knowledge probe: {kept} of the {knowledge['known_by_base']} facts the base knows are still known")
        for name, scores in (record.get("lm_eval") or {}).items():
            print(f"lm-eval {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, (int, float))))
        if out:
            print(f"record: {out}")
    return 0


@torch.no_grad()
def calibration(model, tokenizer, data, classification: bool, batch_size: int) -> dict | None:
    """ECE of the classifier's predicted-class probability, or of a causal LM's first answer token."""
    from deltatune.data import iter_batches, make_collator
    from deltatune.train.objective import MODEL_INPUTS

    if classification and data.eval:
        collate = make_collator(tokenizer, packing=False)
        confidences, correct = [], []
        for batch in iter_batches(data.eval, batch_size, collate):
            logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
            c, ok = classifier_confidences(logits, batch["labels"])
            confidences += c
            correct += ok
        return expected_calibration_error(confidences, correct)
    if data.generation_examples:
        examples = [{"prompt": ex["prompt"], "response": ex["response"]} for ex in data.generation_examples]
        return expected_calibration_error(*answer_token_confidences(model, tokenizer, examples, batch_size))
    return None
