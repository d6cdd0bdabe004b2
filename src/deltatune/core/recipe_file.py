"""Reading YAML recipe files (train, merge, select) with errors that name the file and line.

Every recipe kind is a pydantic model; this module is what they share: read the file (missing,
non-UTF-8, invalid YAML and a top level that is not a mapping are one-line errors), remember the
line of every key, apply ``key.path=value`` overrides, and turn a validation error into
``file:line: what is wrong (closest key)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel

from deltatune.core.config import format_validation_error
from deltatune.utils.errors import ConfigError

T = TypeVar("T", bound=BaseModel)
KeyLines = dict[tuple, int]


def read_recipe_file(path: str | Path, kind: str, top_level: str) -> tuple[dict[str, Any], KeyLines]:
    """``(data, key path → line)`` of the YAML mapping in ``path``. ``kind`` names the recipe in
    errors ("merge recipe"); ``top_level`` lists the sections expected, for the non-mapping error."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {source!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({top_level}) at the top level")
    return data, key_lines(node) if node is not None else {}


def key_lines(node: yaml.Node, prefix: tuple = ()) -> KeyLines:
    """Dotted key path → 1-based line number, from a composed YAML node tree."""
    lines: KeyLines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, path))
    return lines


def line_for(lines: KeyLines, loc: tuple) -> int | None:
    """The line of ``loc`` or of its closest enclosing key."""
    loc = tuple(str(p) for p in loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def at(source: str, lines: KeyLines, loc: tuple) -> str:
    """``source:line`` for the key at ``loc`` (just ``source`` when the line is unknown)."""
    line = line_for(lines, loc)
    return f"{source}:{line}" if line else source


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "delta.r=8"]`` applied to a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def validate_recipe(model_cls: type[T], data: dict[str, Any], source: str, lines: KeyLines) -> T:
    """``model_cls`` validated from ``data``; the first problem is reported at its file line."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{at(source, lines, err.errors()[0]['loc'])}: {format_validation_error(err, model_cls)}") from None
