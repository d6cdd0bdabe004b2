"""Read a candidate pool (or target sample) into :class:`Item` s and check it before any model loads.

Reading goes through :func:`deltatune.data.read_records`, so every format the trainer reads is
a pool, and every error names ``file:line``. Each item keeps its original record (written
back unchanged when selected) and the text views the strategies need: ``text`` (what is
embedded), ``prompt`` and ``response`` (instruction / chat data, for likelihood scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.data.formats import detect_format, field_name
from deltatune.data.sources import Record, read_records
from deltatune.data.templates import normalize_messages
from deltatune.select.config import SourceSection
from deltatune.utils.errors import DataError


@dataclass(frozen=True)
class Item:
    index: int
    origin: str  # file:line
    data: dict[str, Any]
    text: str
    prompt: str = ""
    response: str = ""


@dataclass(frozen=True)
class Pool:
    path: str
    format: str
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        return [item.text for item in self.items]




def read_pool(source: SourceSection, role: str = "pool") -> Pool:
    """All records of ``source`` as items; raises DataError (file:line) on the first bad record."""
    records = read_records(source.path, split=source.split, subset=source.subset, header=source.header,
                           column_names=source.column_names, quoting=source.quoting)
    columns = dict(source.columns)
    items: list[Item] = []
    fmt = None if source.format == "auto" else source.format
    for record in records:
        if record.error is not None:
            raise DataError(record.error)
        if fmt is None:
            fmt = detect_format(record, columns)
        items.append(_item(len(items), record, fmt, columns))
    if not items:
        raise DataError(f"{source.path}: the {role} is empty; expected at least one record")
    return Pool(source.path, fmt, items)


def resolve_budget(budget: int | float | None, pool: Pool) -> int | None:
    """A count from a count or a fraction of the pool; refuses a budget larger than the pool."""
    if budget is None:
        return None
    n = len(pool)
    count = max(1, round(budget * n)) if isinstance(budget, float) else int(budget)
    if count > n:
        raise DataError(f"{pool.path}: budget {budget} is larger than the pool ({n} records); expected at most {n} or a fraction below 1")
    return count


def check_target(target: Pool, pool: Pool) -> None:
    if target.format != pool.format:
        first = target.items[0].origin
        raise DataError(
            f"{first}: the target sample is {target.format!r} data but the pool {pool.path} is {pool.format!r} data; "
            f"expected the same format (set format and columns of target so both give the same fields)"
        )


# ---------------------------------------------------------------- text views per format

def _item(index: int, record: Record, fmt: str, columns: dict[str, str]) -> Item:
    data = record.data or {}
    if fmt == "text":
        return Item(index, record.origin, data, _field(record, "text", columns))
    if fmt == "classification":
        text = _field(record, "text", columns)
        pair = _field(record, "text_pair", columns, required=False)
        return Item(index, record.origin, data, f"{text} {pair}" if pair else text)
    if fmt == "instruction":
        if field_name("instruction", columns) in data or field_name("prompt", columns) not in data:
            prompt = _field(record, "instruction", columns)
            extra = _field(record, "input", columns, required=False)
            prompt = f"{prompt}\n{extra}" if extra else prompt
            response = _field(record, "output", columns)
        else:
            prompt, response = _field(record, "prompt", columns), _field(record, "response", columns)
        return Item(index, record.origin, data, f"{prompt}\n{response}", prompt, response)
    if fmt == "chat":
        key = field_name("messages", columns, data)
        if key not in data:
            raise DataError(f"{record.origin}: field {key!r} is missing; found keys {sorted(data)}; map one of your columns with columns.messages")
        messages = normalize_messages(data[key], record.origin)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{record.origin}: the conversation has no assistant turn; expected at least one")
        prompt = "\n".join(m["content"] for m in messages[:last])
        response = messages[last]["content"]
        return Item(index, record.origin, data, "\n".join(m["content"] for m in messages), prompt, response)
    raise DataError(f"{record.origin}: unsupported format {fmt!r} for selection; expected text, classification, instruction or chat")


def _field(record: Record, name: str, columns: dict[str, str], required: bool = True) -> str:
    data = record.data or {}
    key = field_name(name, columns, data)
    value = data.get(key)
    if value is None:
        if not required:
            return ""
        hint = f" (columns.{name})" if name in columns else f"; map one of your columns to it with columns.{name}"
        raise DataError(f"{record.origin}: text field {key!r} is {'null' if key in data else 'missing'}; found keys {sorted(data)}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{record.origin}: field {key!r} must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{record.origin}: field {key!r} is empty; expected non-empty text")
    return value
