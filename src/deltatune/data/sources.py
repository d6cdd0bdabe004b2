"""Read raw records from files and data sets, each tagged with where it came from.

Every record carries ``origin`` — ``file:line`` for line-based files (JSONL, CSV/TSV, TXT,
and JSON lists, whose objects are located by line too), ``file:row N`` (0-based) for Parquet
and Hugging Face data sets — so any later error can point at the exact record.

A record that cannot be parsed (one bad JSONL line, a TSV row with the wrong number of
fields) is yielded with ``error`` set instead of raising here, so the caller decides between
stopping and skipping (``on_error``). A file that cannot be read at all raises ``DataError``.

``pyarrow`` and ``datasets`` are imported only when a Parquet file or an HF data set is read.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deltatune.utils.errors import DataError, did_you_mean

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    """One raw example: its fields (``data``), where it came from, or why it could not be parsed."""

    data: dict[str, Any] | None
    origin: str
    error: str | None = None


def read_records(
    path: str | os.PathLike,
    *,
    split: str = "train",
    subset: str | None = None,
    header: bool = True,
    column_names: list[str] | None = None,
    quoting: Literal["auto", "csv", "none"] = "auto",
) -> Iterator[Record]:
    """Yield the records of one source lazily, in file order.

    ``path`` is a local file (kind chosen by suffix), a ``save_to_disk`` directory, or a hub
    data set id. ``split``/``subset`` apply to HF data sets; ``header``/``column_names``/
    ``quoting`` to CSV/TSV (see :class:`deltatune.data.config.DataConfig`).
    """
    p = Path(path)
    if p.is_dir():
        return _read_hf_disk(p, split)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix == ".jsonl":
            return _read_jsonl(p)
        if suffix == ".json":
            return _read_json(p)
        if suffix in (".csv", ".tsv"):
            return _read_delimited(p, header=header, column_names=column_names, quoting=quoting)
        if suffix == ".parquet":
            return _read_parquet(p)
        if suffix == ".txt":
            return _read_txt(p)
        raise DataError(f"{p}: unsupported file type {suffix or '(no suffix)'!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    # Looks like a file name (suffix, or an explicit ./ or / path) but is missing: say so,
    # rather than sending a typo to the hub.
    if suffix in FILE_SUFFIXES or str(path).startswith((".", "/", "~")) or p.parent.is_dir() and p.parent != Path("."):
        siblings = [c.name for c in p.parent.iterdir()] if p.parent.is_dir() else []
        raise DataError(f"{p}: no such file or directory{did_you_mean(p.name, siblings)}")
    return _read_hf_hub(str(path), split, subset)


# ---------------------------------------------------------------- line-based text files

def not_utf8_error(path: Path) -> DataError:
    """The error for a file that failed to decode, at the first line that is not UTF-8.

    Text readers decode in buffered chunks, so their UnicodeDecodeError can point at an earlier
    line; the bytes are re-read line by line to name the right one (only on this error path).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8")
    return DataError(f"{path}: not valid UTF-8; save the file as UTF-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); ``utf-8-sig`` drops a leading BOM."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no record
        origin = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield Record(None, origin, f"{origin}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON object per line")
            continue
        if not isinstance(obj, dict):
            yield Record(None, origin, f"{origin}: expected a JSON object per line, found {type(obj).__name__}")
            continue
        yield Record(obj, origin)


def _read_txt(path: Path) -> Iterator[Record]:
    for lineno, line in _lines(path):
        if line.strip():
            yield Record({"text": line}, f"{path}:{lineno}")


def _read_delimited(path: Path, *, header: bool, column_names: list[str] | None, quoting: str) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    quoted = quoting == "csv" or (quoting == "auto" and delimiter == ",")
    names: list[str] | None = list(column_names) if column_names else None
    for lineno, fields in (_quoted_rows(path, delimiter) if quoted else _split_rows(path, delimiter)):
        if fields is None:
            continue
        if header and names is None:
            names = [f.strip() for f in fields]
            if len(set(names)) != len(names):
                raise DataError(f"{path}:{lineno}: header has duplicate column names: {names}")
            continue
        if names is None:  # header: false and no names given → "0", "1", …
            names = [str(i) for i in range(len(fields))]
        origin = f"{path}:{lineno}"
        if len(fields) != len(names):
            sep = "tab" if delimiter == "\t" else "comma"
            hint = "" if header or column_names else "; set column_names if the first row is not representative"
            yield Record(None, origin, f"{origin}: expected {len(names)} {sep}-separated fields ({', '.join(names)}), found {len(fields)}{hint}")
            continue
        yield Record(dict(zip(names, fields)), origin)
    if names is None and header:
        raise DataError(f"{path}: empty file; expected a header line and records")


def _split_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str] | None]]:
    """No quoting at all: a field is whatever lies between delimiters (GLUE TSVs)."""
    for lineno, line in _lines(path):
        yield lineno, (line.split(delimiter) if line.strip() else None)


def _quoted_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str] | None]]:
    """RFC-4180 quoting via :mod:`csv`; the line number is where the (maybe multi-line) row starts."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            start = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise DataError(f"{path}:{reader.line_num}: unreadable CSV row ({err}); try quoting: none") from None
                yield start, (row if any(c.strip() for c in row) else None)
                start = reader.line_num + 1
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None


# ---------------------------------------------------------------- JSON list

def _read_json(path: Path) -> Iterator[Record]:
    """A top-level list of objects, decoded one element at a time so each gets its line number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    decoder = json.JSONDecoder()
    n = len(text)
    line, counted = 1, 0  # line number of position `counted`, advanced lazily

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def bad(i: int, what: str) -> DataError:
        return DataError(f"{path}:{line_at(i)}: invalid JSON ({what}); expected a JSON list of objects (use .jsonl for one object per line)")

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        found = "an empty file" if i >= n else f"{text[i]!r}"
        if i < n and text[i] == "{":
            found = "a single object"
        raise DataError(f"{path}:{line_at(i)}: expected a JSON list of objects, found {found}; use .jsonl for one object per line")
    i = skip_ws(i + 1)
    index = 0
    while True:
        if i >= n:
            raise bad(i, "unexpected end of file")
        if text[i] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); expected a JSON list of objects"
            ) from None
        origin = f"{path}:{line_at(i)}"
        if isinstance(obj, dict):
            yield Record(obj, origin)
        else:
            yield Record(None, origin, f"{origin}: list item {index} is a {type(obj).__name__}; expected a JSON object")
        index += 1
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i >= n or text[i] != "]":
            raise bad(i, "expected ',' or ']' after a list item")
    if skip_ws(i + 1) != n:
        raise bad(skip_ws(i + 1), "extra data after the closing ']'")


# ---------------------------------------------------------------- columnar sources (lazy imports)

def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; pip install 'deltatune[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield Record(obj, f"{path}:row {row}")
            row += 1


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading Hugging Face data sets needs `datasets`; pip install 'deltatune[data]'") from None
    return datasets


def _iter_hf(ds: Any, where: str) -> Iterator[Record]:
    for row, obj in enumerate(ds):
        yield Record(dict(obj), f"{where}:row {row}")


def _read_hf_disk(path: Path, split: str) -> Iterator[Record]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).is_file() for m in markers):
        files = sorted(c.name for c in path.iterdir())[:10]
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk (no {' / '.join(markers)}); "
            f"point path at a data file instead (found: {', '.join(files) or 'nothing'})"
        )
    datasets = _import_datasets(str(path))
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}{did_you_mean(split, list(ds))}; available: {', '.join(ds)}")
        ds = ds[split]
        return _iter_hf(ds, f"{path}[{split}]")
    return _iter_hf(ds, str(path))


def _read_hf_hub(name: str, split: str, subset: str | None) -> Iterator[Record]:
    datasets = _import_datasets(name)
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, offline mode, unknown id/split: one readable message
        raise DataError(
            f"{name}: not a local file, and loading it as a Hugging Face hub data set failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return _iter_hf(ds, f"{name}[{split}]")
