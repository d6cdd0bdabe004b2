"""The C++ BGMV kernel (``kernels/bgmv_cpu.cpp``) for one-token-per-adapter LoRA on the CPU, built on first use.

torch's JIT extension builder compiles it once per machine (about 30 s; cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) with the vector flags of the CPU
it runs on — the capability is part of the module name, so a cache shared by different machines
never hands one a build it cannot run. Without a compiler (or with ``DELTATUNE_CPU_KERNEL=0``)
:func:`bgmv_kernel` returns None and the engine uses batched matmuls instead: same results, slower.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels") / "bgmv_cpu.cpp"
# Flags per torch CPU capability; the kernel's AVX-512 path needs only AVX-512F, the rest is plain C++.
FLAGS = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}

_lock = threading.Lock()
_state: dict[str, object] = {}


def bgmv_kernel():
    """The compiled module (``bgmv_(y, x, A, Bt, slots)``), or None when it cannot be built here."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build():
    if os.environ.get("DELTATUNE_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    cap = torch.backends.cpu.get_cpu_capability()
    log.info("building the CPU LoRA kernel for %s (once per machine, ~30 s)", cap)
    try:
        return load(name=f"deltatune_bgmv_{cap.lower()}", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", *FLAGS.get(cap, [])], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, no headers: the matmul path still serves every request
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("CPU LoRA kernel unavailable (%s); using batched matmuls", first)
        return None
