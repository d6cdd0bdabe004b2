"""What machine a benchmark ran on, recorded in every result file (speeds differ between the Intel
and AMD machines sessions get, so a figure without its CPU model cannot be compared)."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor() or "unknown")
    except OSError:
        return platform.processor() or "unknown"


def machine_info() -> dict:
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "python": platform.python_version()}
