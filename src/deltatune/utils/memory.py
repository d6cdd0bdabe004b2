"""Process-level memory settings for training on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_MB = 4.0
# Memory-efficient optimizers (GaLore, LISA, LOMO, MeZO …) are chosen to save memory, so they trade
# some speed for a smaller peak: see ``mmap_threshold_mb``.
LEAN_MMAP_THRESHOLD_MB = 2.0
_applied: int | None = None


def mmap_threshold_mb(setting: float | None, optimizer: str = "adamw") -> float:
    """The glibc mmap threshold a training run uses: ``train.malloc_mmap_threshold_mb`` if set, else
    4 MiB for AdamW and 2 MiB for the memory-efficient optimizers.

    Why 2 MiB for those: a decoder layer's hidden states (batch x seq x hidden, 2.4 MB for
    SmolLM2 at 4 x 256) sit below 4 MiB, so they come from the heap; the inputs that gradient
    checkpointing keeps end up scattered between freed temporaries, and the heap's resident size
    grows ~3x faster than the live data (LOMO on SmolLM2: peak 1524 MB at 4 MiB, 1247 MB at 2 MiB,
    1254 MB at 1 MiB — docs/benchmarks.md). Mmapped blocks cost page faults on every reuse, which
    is why AdamW (whose peak is its state, not these tensors) keeps 4 MiB.
    """
    if setting is not None:
        return float(setting)
    return DEFAULT_MMAP_THRESHOLD_MB if optimizer == "adamw" else LEAN_MMAP_THRESHOLD_MB


def tune_allocator(mmap_threshold: int = int(DEFAULT_MMAP_THRESHOLD_MB * 2**20)) -> bool:
    """Make glibc return blocks of ``mmap_threshold`` bytes or more to the OS as soon as they are freed.

    Why: glibc raises its mmap threshold dynamically (up to 32 MiB) each time a large mmapped
    block is freed, after which activation-sized tensors are carved from the heap and never
    given back; a training step's peak RSS then grows well past its live memory (SmolLM2-135M
    LoRA, seq 256 x batch 8, second step: 5.9 GB by default, 4.0 GB with a 4 MiB threshold,
    3.5 GB with 1 MiB). A fixed threshold keeps every block >= ``mmap_threshold`` mmapped, so
    freeing it unmaps it. Each mmap costs page faults, so a lower threshold trades speed for
    memory (LISA on SmolLM2, 1 thread: ~10-30 % fewer tokens/s at 1-2 MiB than at 4 MiB).
    Setting it again with another value takes effect (the last call wins). Returns False where
    this is not glibc (macOS, musl): nothing is changed there.
    """
    global _applied
    if not sys.platform.startswith("linux"):
        return False
    if _applied == mmap_threshold:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, mmap_threshold) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = mmap_threshold
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
