"""``deltatune export``: a base model with its deltas merged in, as a HF directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from deltatune.utils.errors import ConfigError

HF_DTYPES = ("float32", "float16", "bfloat16")
GGUF_DTYPES = {"f32": "f32", "f16": "f16", "float32": "f32", "float16": "f16"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge deltas into the base model and write it as a HF directory or a GGUF file")
    p.add_argument("--model", required=True, help="alias, HF directory, .gguf file or hub id")
    p.add_argument("--adapter", action="append", default=[], help="a delta directory to merge (repeatable; merged in the order given)")
    p.add_argument("--to", required=True, choices=("hf", "gguf"), dest="format", help="output format")
    p.add_argument("out", help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", help="hf: float32 (default), float16, bfloat16; gguf: f32 (default), f16")
    p.set_defaults(run=run)


def source_gguf(model: str) -> Path | None:
    """The GGUF file ``model`` names (an alias or a path), whose tokenizer metadata the export copies."""
    from deltatune.models.aliases import resolve_alias

    path = resolve_alias(model) or Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def run(args) -> int:
    import deltatune
    from deltatune.core.state import read_delta_config
    from deltatune.export import export_gguf, export_hf
    from deltatune.models.load import prepare_model

    out = Path(args.out)
    if args.format == "gguf":
        dtype = GGUF_DTYPES.get(args.dtype or "f32")
        if dtype is None:
            raise ConfigError(f"--dtype {args.dtype!r} is not supported for GGUF; expected f32 or f16")
        if out.suffix.lower() != ".gguf":
            raise ConfigError(f"GGUF output {str(out)!r} must be a file name ending in .gguf")
        if out.is_dir():
            raise ConfigError(f"GGUF output {str(out)!r} is a directory; expected a file path")
    else:
        dtype = args.dtype or "float32"
        if dtype not in HF_DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not supported for HF export; expected one of {', '.join(HF_DTYPES)}")
        if out.is_file():
            raise ConfigError(f"HF output {str(out)!r} is an existing file; expected a directory path")
    # Everything that can be checked without the weights is checked first.
    for adapter in args.adapter:
        read_delta_config(adapter)
    _, config, _ = prepare_model(args.model, task="causal-lm" if args.format == "gguf" else None)
    if args.format == "gguf" and config.model_type not in ("llama", "mistral"):
        raise ConfigError(f"GGUF export supports llama-family models; {args.model!r} is {config.model_type!r} — use --to hf")

    model = deltatune.load_model(args.model)
    tokenizer = deltatune.load_tokenizer(args.model)
    names = []
    for adapter in args.adapter:
        model = deltatune.load_delta(model, adapter)
        names.append(model.active[0])
    if names:
        model.set_active(names)
    if args.format == "hf":
        export_hf(model, out, tokenizer=tokenizer, dtype=dtype)
    else:
        export_gguf(model, out, tokenizer=tokenizer, source_gguf=source_gguf(args.model), dtype=dtype)
    print(f"wrote {out} ({args.format}, {dtype}; merged: {', '.join(names) or 'no deltas'})")
    return 0
