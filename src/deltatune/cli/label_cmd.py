"""``deltatune label``: pseudo-label an unlabelled pool with a trained classifier (model + delta)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="pseudo-label an unlabelled pool with a trained classifier (writes JSONL)")
    p.add_argument("--model", required=True, help="the base model the delta was trained on")
    p.add_argument("--adapter", required=True, help="the trained classification delta (with its head)")
    p.add_argument("--data", required=True, help="the unlabelled pool: JSONL / JSON / CSV / TSV / Parquet with a text column")
    p.add_argument("--out", required=True, help="output JSONL: text [, text_pair], label, confidence")
    p.add_argument("--num-labels", type=int, default=None, help="classes of the head (default: read from the delta's head)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="keep only rows whose predicted class has at least this probability")
    p.add_argument("--text-column", default=None, help="the column holding the text (default: text, sentence or sentence1)")
    p.add_argument("--pair-column", default=None, help="the column holding the second text of a pair, if any")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records (e.g. the labelled ones, when the pool is the same file)")
    p.add_argument("--max-examples", type=int, default=None, help="label at most N records (after --skip)")
    p.set_defaults(run=run)


def head_classes(adapter: str) -> int | None:
    """The number of classes of the head a delta carries (its ``classifier``/``score`` weight), if any."""
    from pathlib import Path

    from safetensors import safe_open

    from deltatune.core.state import WEIGHTS_FILE

    path = Path(adapter) / WEIGHTS_FILE
    if not path.is_file():
        return None  # load_delta names what is missing
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return int(f.get_slice(key).get_shape()[0])
    return None


def run(args) -> int:
    from deltatune.data.config import DataConfig
    from deltatune.data.dataset import load_records
    from deltatune.utils.errors import ConfigError, DataError

    if not 0.0 <= args.min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence {args.min_confidence}: expected a probability in [0, 1]")
    num_labels = args.num_labels or head_classes(args.adapter)
    if not num_labels:
        raise ConfigError(f"{args.adapter}: no classification head (classifier/score weight) found in the delta; "
                          "pass --num-labels, and train the delta with its head in modules_to_save")
    columns = {k: v for k, v in (("text", args.text_column), ("text_pair", args.pair_column)) if v}
    if args.skip < 0:
        raise ConfigError(f"--skip {args.skip}: expected a count >= 0")
    limit = None if args.max_examples is None else args.skip + args.max_examples
    records = load_records(DataConfig(path=args.data, columns=columns), args.data, "train", limit)[args.skip:]
    if not records:
        raise DataError(f"{args.data}: the pool is empty")
    from deltatune.select.pseudo_label import pseudo_label, record_texts

    texts = record_texts(records, columns)  # every record checked before the model loads
    import deltatune
    from deltatune.utils.io import write_text_atomic

    tokenizer = deltatune.load_tokenizer(args.model)
    model = deltatune.load_model(args.model, task="sequence-classification", num_labels=num_labels)
    model = deltatune.load_delta(model, args.adapter)
    rows, report = pseudo_label(model, tokenizer, texts, args.max_length, args.batch_size, args.min_confidence)
    write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(json.dumps({"out": args.out, **report}))
    return 0
