"""``deltatune inspect``: load time, parameter counts, module names and shapes, LoRA-targetable names."""
from __future__ import annotations

import time
from collections import defaultdict


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's modules, shapes and which names LoRA can target")
    p.add_argument("--model", required=True, help="alias, HF directory, .gguf file or hub id")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification", "encoder"], default=None)
    p.add_argument("--num-labels", type=int, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from deltatune.core.inject import iter_logical_modules
    from deltatune.core.targets import head_module_names
    from deltatune.models.load import load_model, prepare_model

    t0 = time.perf_counter()
    # Start-up (imports, config; GGUF conversion on a cache miss), timed apart from reading weights.
    prepare_model(args.model, task=args.task, num_labels=args.num_labels)
    t1 = time.perf_counter()
    model = load_model(args.model, task=args.task, num_labels=args.num_labels)
    t2 = time.perf_counter()
    total = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({type(model).__name__}, {getattr(model.config, 'model_type', '?')})")
    print(f"load time: {t2 - t1:.2f} s (weights; start-up before it: {t1 - t0:.2f} s for imports, config, GGUF cache)")
    print(f"parameters: {total:,}")
    heads = head_module_names(model)
    by_leaf: dict[str, list] = defaultdict(list)
    for name, module in iter_logical_modules(model):
        if not list(module.children()):
            shape = tuple(module.weight.shape) if hasattr(module, "weight") and module.weight is not None else ()
            by_leaf[(name.rsplit(".", 1)[-1], type(module).__name__, shape)].append(name)
    print(f"\n{'leaf name':<24}{'type':<22}{'weight shape':<18}{'count':>6}  example")
    for (leaf, kind, shape), names in by_leaf.items():
        print(f"{leaf:<24}{kind:<22}{str(list(shape)):<18}{len(names):>6}  {names[0]}")
    linear = sorted({n.rsplit('.', 1)[-1] for n, m in iter_logical_modules(model) if isinstance(m, torch.nn.Linear) and n not in heads})
    print(f"\nLoRA can target (nn.Linear, 'all-linear' selects all of them): {', '.join(linear)}")
    if heads:
        print(f"output head (excluded from all-linear): {', '.join(sorted(heads))}")
    return 0
