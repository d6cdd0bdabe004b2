"""Training data: read records, render them, tokenize, split, pad or pack, and batch.

    train, eval, report = build_datasets(DataConfig(path="data.jsonl"), tokenizer, seed=0)
    collate = make_collator(tokenizer, packing=config.packing, mask_dtype=model.dtype)
    stream = BatchStream(train, batch_size=8, seed=0, collate=collate)

Label convention: ``labels[b, j]`` is the target *at* position ``j`` (unshifted, -100 = no
loss); the loss is ``cross_entropy(logits[:, :-1], labels[:, 1:])``.
"""
from deltatune.data.collate import (
    PackedCollator,
    PadCollator,
    block_causal_mask,
    make_collator,
    pack_examples,
    pad_token_id,
)
from deltatune.data.config import DataConfig
from deltatune.data.dataset import DataReport, build_datasets, load_records, split_records
from deltatune.data.formats import IGNORE_INDEX, ExampleEncoder, LabelMap, detect_format, encode_segments
from deltatune.data.sources import Record, read_records
from deltatune.data.stream import BatchStream, epoch_order, iter_batches

__all__ = [
    "IGNORE_INDEX",
    "BatchStream",
    "DataConfig",
    "DataReport",
    "ExampleEncoder",
    "LabelMap",
    "PackedCollator",
    "PadCollator",
    "Record",
    "block_causal_mask",
    "build_datasets",
    "detect_format",
    "encode_segments",
    "epoch_order",
    "iter_batches",
    "load_records",
    "make_collator",
    "pack_examples",
    "pad_token_id",
    "read_records",
    "split_records",
]
