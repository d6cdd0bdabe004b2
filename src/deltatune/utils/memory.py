"""Process-level memory settings for training on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(mmap_threshold: int = 4 << 20) -> bool:
    """Make glibc return activation-sized blocks to the OS as soon as they are freed.

    Why: glibc raises its mmap threshold dynamically (up to 32 MiB) each time a large mmapped
    block is freed, after which activation-sized tensors are carved from the heap and never
    given back; a training step's peak RSS then grows well past its live memory (SmolLM2-135M
    LoRA, seq 256 x batch 8, second step: 5.9 GB by default, 4.0 GB with a 4 MiB threshold,
    3.5 GB with 1 MiB). A fixed threshold keeps every block >= ``mmap_threshold`` mmapped, so
    freeing it unmaps it. 4 MiB rather than 1 MiB because each mmap costs page faults: at 1 MiB
    a small model's many mid-sized tensors spent half the CPU time in the kernel. Returns False
    where this is not glibc (macOS, musl): nothing is changed there.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, mmap_threshold) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


def proc_status_mb(field: str = "VmRSS") -> float:
    """A memory line of ``/proc/self/status`` in MB: ``VmRSS`` (resident now), ``VmHWM`` (its peak),
    ``RssAnon`` (anonymous pages only: tensors and heap, not mapped files). NaN off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
