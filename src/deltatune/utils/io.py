"""Atomic file writes and path checks.

Writes go to a temporary sibling, then ``os.replace`` — a crash mid-write leaves the previous
file (or directory) intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltatune.utils.errors import DeltatuneError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temp directory; on success it replaces ``path`` (old one removed last).

    If anything raises inside the block, the temp directory is removed and ``path`` is untouched.
    ``replace=False`` is for content-addressed entries: if ``path`` already exists when the block
    ends (another process finished first), the new copy is discarded and the existing one kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            os.replace(path, old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        os.replace(tmp, path)
    except BaseException:  # the new copy could not take its place: put the old one back, leave no temp
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safe_child(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` if it stays inside ``root``; otherwise a DeltatuneError (no ``..``, no absolute names)."""
    if any(ord(c) < 32 or c == "\x7f" for c in name):  # a NUL would make the OS call itself fail
        raise DeltatuneError(f"name {name!r} contains a control character")
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / name).resolve()
    if name in ("", ".") or not candidate.is_relative_to(root_resolved) or candidate == root_resolved:
        raise DeltatuneError(f"name {name!r} escapes or is not inside directory {str(root)!r}")
    return candidate
