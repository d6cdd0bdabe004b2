"""The errors a serving request can end with; the HTTP layer maps each to a status."""
from __future__ import annotations

from deltatune.utils.errors import DeltatuneError


class RequestError(DeltatuneError, ValueError):
    """A request the engine cannot run as given (too long, empty prompt, bad token ids)."""


class EngineError(DeltatuneError):
    """A step failed for a reason of the server's own (a bug, out of memory): the detail is logged."""


class QueueFullError(DeltatuneError):
    """The engine's request queue is at its bound; the client should retry later."""
