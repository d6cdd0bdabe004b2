"""Hold Ctrl-C over a block that must finish as a whole.

A training step changes the weights (``optimizer.step()``) and then the step counter and the data
position. A ``KeyboardInterrupt`` between the two would checkpoint updated weights with the old
counter, and the resumed run would apply that batch a second time. Inside :func:`interrupts_held`
a SIGINT is only recorded; the ``KeyboardInterrupt`` is raised when the block has ended.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Defer SIGINT to the end of the block (a no-op outside the main thread, where signals never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
