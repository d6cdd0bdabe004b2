"""The glibc mmap threshold a run uses: per optimizer by default, a recipe setting, and its effect."""
import subprocess
import sys

import pytest

from deltatune.train.config import TrainLoopConfig
from deltatune.utils.errors import ConfigError
from deltatune.utils.memory import mmap_threshold_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def test_memory_efficient_optimizers_default_to_a_lower_threshold():
    assert mmap_threshold_mb(None, "adamw") == 4.0
    for name in ("galore", "lisa", "lomo", "adalomo", "mezo", "sparse_mezo"):
        assert mmap_threshold_mb(None, name) == 2.0
    assert mmap_threshold_mb(3, "lomo") == 3.0  # the recipe's value wins


def test_threshold_setting_is_validated():
    assert TrainLoopConfig(malloc_mmap_threshold_mb=1.5).malloc_mmap_threshold_mb == 1.5
    with pytest.raises((ConfigError, ValueError), match="malloc_mmap_threshold_mb"):
        TrainLoopConfig(malloc_mmap_threshold_mb=0)


# Half of 60 blocks of 1.5 MB are freed, every other one: from the heap (threshold 4 MiB) the holes
# stay resident; mmapped (threshold 1 MiB) each freed block goes back to the OS at once.
PROBE = """
import sys, torch
from deltatune.utils.memory import proc_status_mb, tune_allocator
assert tune_allocator(int(float(sys.argv[1]) * 2**20))
blocks = [torch.ones(375_000) for _ in range(60)]
before = proc_status_mb("RssAnon")
del blocks[::2]
print(before - proc_status_mb("RssAnon"))
"""


def released_mb(threshold_mb: float) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_lower_threshold_returns_freed_activation_sized_blocks():
    assert released_mb(1) > 35  # ~45 MB freed, all of it returned
    assert released_mb(4) < 10  # freed into heap holes, still resident
