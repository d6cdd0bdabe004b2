"""The error types users see.

Every message names the file / line / key / module involved, what was found and what was
expected, and where it helps the closest valid choice. The CLI prints ``str(error)`` on one
line and exits non-zero.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeltatuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltatuneError, ValueError):
    """A config / recipe value is unknown, of the wrong type or inconsistent."""


class TargetError(DeltatuneError, ValueError):
    """A target pattern selects no module, or selects a module the method cannot wrap."""


class ShapeMismatchError(DeltatuneError, ValueError):
    """A saved delta does not fit the model it is loaded onto."""


class ModelLoadError(DeltatuneError, OSError):
    """A model path / file / alias cannot be loaded."""


class DeltaFileError(DeltatuneError, OSError):
    """A delta directory is missing files or holds unreadable / unsupported content."""


class DataError(DeltatuneError, ValueError):
    """A data file or record is malformed."""


class CapabilityError(DeltatuneError, ValueError):
    """A tool asked a delta for something its method cannot offer (exact low-rank factors, say)."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The few choices most similar to ``word`` (difflib ratio), best first."""
    choices = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not found:
        # Substring hits help for long dotted module names ("q_proj" vs "layers.0.self_attn.q_proj").
        found = [c for c in choices if word in c or c in word][:n]
    return found


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    found = closest(word, choices, n)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


def one_line(err: BaseException) -> str:
    """``Type: message`` folded onto one line, for wrapping third-party exceptions."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
