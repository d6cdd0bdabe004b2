"""From a :class:`DataConfig` to tokenized train / eval examples and a report.

Steps: read records (lazily, stopping at ``max_examples``) → hold out ``eval_fraction`` by a
seeded permutation → detect the format → build the label map (classification) → encode every
record (bad ones raise, or are skipped and counted with ``on_error: skip``) → optionally pack.
Everything is in memory as plain Python lists; the batch order is the job of
:class:`deltatune.data.stream.BatchStream`.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from deltatune.data.collate import pack_examples
from deltatune.data.config import DataConfig
from deltatune.data.formats import LM_FORMATS, ExampleEncoder, LabelMap, detect_format, field_name
from deltatune.data.sources import Record, read_records
from deltatune.utils.errors import ConfigError, DataError

MAX_REPORTED_ERRORS = 20


@dataclass
class DataReport:
    """What :func:`build_datasets` did: counts, the format and template used, labels, skips."""

    format: str = ""
    template: str = "none"
    records_read: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS skip reasons
    truncated: int = 0
    label_names: list[str] | None = None
    num_labels: int | None = None
    train_tokens: int = 0
    trained_tokens: int = 0  # tokens with a label (LM formats)
    longest: int = 0
    packed_rows: int | None = None
    packing_efficiency: float | None = None  # real tokens / (rows × max_length)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        parts = [
            f"format={self.format}",
            f"template={self.template}",
            f"train={self.train_examples}",
            f"eval={self.eval_examples}",
            f"skipped={self.skipped}",
            f"truncated={self.truncated}",
            f"tokens={self.train_tokens}",
        ]
        if self.num_labels is not None:
            parts.append(f"num_labels={self.num_labels}")
        if self.packed_rows is not None:
            parts.append(f"packed_rows={self.packed_rows} ({self.packing_efficiency:.0%} full)")
        return "data: " + " ".join(parts)


def load_records(config: DataConfig, path: str, split: str, limit: int | None) -> list[Record]:
    """The first ``limit`` records of one source (all if None)."""
    records = read_records(
        path,
        split=split,
        subset=config.subset,
        header=config.header,
        column_names=config.column_names,
        quoting=config.quoting,
    )
    return list(itertools.islice(records, limit))


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``round(fraction × n)`` records (at least 1 when fraction > 0) chosen by a seeded
    permutation; both parts keep file order. Same records + seed → same split."""
    if fraction <= 0:
        return records, []
    n = len(records)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(f"eval_fraction={fraction} of {n} records leaves no training data")
    held = set(random.Random(f"deltatune-split:{seed}").sample(range(n), n_eval))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def build_datasets(config: DataConfig, tokenizer: Any, seed: int = 0) -> tuple[list[dict], list[dict], DataReport]:
    """Read, split, tokenize (and pack) the data of ``config``.

    Returns ``(train, eval, report)``: lists of examples as described in
    :mod:`deltatune.data.formats` — or, with ``packing``, rows from
    :func:`deltatune.data.collate.pack_examples` — ready for ``make_collator``; ``eval`` is
    empty when no eval data is configured. Raises ConfigError / DataError naming the file,
    line and field at fault.
    """
    if not config.path:
        raise ConfigError("data.path is not set; expected a data file, a save_to_disk directory or a hub data set id")
    report = DataReport()
    train_records = load_records(config, config.path, config.split, config.max_examples)
    if config.eval_path or config.eval_split:
        eval_records = load_records(
            config, config.eval_path or config.path, config.eval_split or config.split, config.max_eval_examples
        )
    else:
        train_records, eval_records = split_records(train_records, config.eval_fraction, seed)
        eval_records = eval_records[: config.max_eval_examples] if config.max_eval_examples else eval_records
    report.records_read = len(train_records) + len(eval_records)
    if not train_records:
        raise DataError(f"{config.path}: no records found; expected at least one training example")

    fmt = config.format
    if fmt == "auto":
        first = next((r for r in train_records if r.error is None), None)
        if first is None:
            raise DataError(train_records[0].error or f"{config.path}: no readable records")
        fmt = detect_format(first, dict(config.columns))
    if config.packing and fmt not in LM_FORMATS:
        raise ConfigError(f"data.packing applies to language-modelling formats ({', '.join(LM_FORMATS)}), not {fmt}")
    report.format = fmt
    if config.augment is not None:  # after the eval split: evaluation records are never augmented
        from deltatune.select.augment import augment_train_records

        train_records = augment_train_records(train_records, config.augment, dict(config.columns))

    label_map = None
    if fmt == "classification":
        key = field_name("label", dict(config.columns))
        values = (r.data.get(key) for r in train_records + eval_records if r.data is not None)
        label_map = LabelMap.from_values((v for v in values if v is not None), config.label_names)
        report.label_names, report.num_labels = label_map.names, label_map.num_labels

    encoder = ExampleEncoder(config, tokenizer, fmt, label_map)
    report.template = encoder.template
    train = _encode_all(encoder, train_records, config.on_error, report)
    evaluation = _encode_all(encoder, eval_records, config.on_error, report)
    if not train:
        raise DataError(f"{config.path}: all {len(train_records)} training records were skipped; first error: {report.errors[0]}")
    report.train_examples, report.eval_examples = len(train), len(evaluation)
    report.train_tokens = sum(len(e["input_ids"]) for e in train)
    report.longest = max(len(e["input_ids"]) for e in train)
    if fmt in LM_FORMATS:
        report.trained_tokens = sum(sum(1 for lab in e["labels"][1:] if lab != -100) for e in train)

    if config.packing:
        if config.shuffle:
            # Pack a seeded shuffle so rows mix examples from all over the file.
            train = [train[i] for i in random.Random(f"deltatune-pack:{seed}").sample(range(len(train)), len(train))]
        train = pack_examples(train, config.max_length)
        evaluation = pack_examples(evaluation, config.max_length)
        report.packed_rows = len(train)
        report.packing_efficiency = report.train_tokens / (len(train) * config.max_length)
    return train, evaluation, report


def _encode_all(encoder: ExampleEncoder, records: Iterable[Record], on_error: str, report: DataReport) -> list[dict]:
    out = []
    for record in records:
        try:
            example, truncated = encoder(record)
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(str(err))
            continue
        report.truncated += truncated
        out.append(example)
    return out
