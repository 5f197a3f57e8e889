"""host_memory.trim: freed heap pages go back to the operating system (glibc only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyexperts.training import host_memory


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(host_memory._malloc_trim() is None or not Path("/proc/self/status").exists(),
                    reason="needs glibc's malloc_trim and /proc")
def test_trim_returns_freed_small_blocks():
    # 200 MiB in blocks small enough to come from the heap, not from their own mmap.
    blocks = [bytearray(4096) for _ in range(50_000)]
    for block in blocks[::2]:
        block[0] = 1
    keep = blocks[-1]  # a block at the top of the heap would pin it; keep one anyway
    del blocks
    before = _rss_kib()
    assert host_memory.trim()
    after = _rss_kib()
    assert before - after > 100 * 1024, (before, after)  # most of the 200 MiB came back
    assert keep[0] == 0


_FAULTS_SCRIPT = """
import resource, sys
import torch
import torch.nn.functional as F
from anyexperts.training import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
torch.manual_seed(0)
# The stacked experts of a layer with 64 experts (hidden 256, FFN 512): 64 + 32 MiB of weight
# gradients allocated afresh by every backward.
E, H, FFN, N = 64, 256, 512, 1024
w1 = torch.randn(E, H, 2 * FFN, requires_grad=True)
w2 = torch.randn(E, FFN, H, requires_grad=True)
offs = torch.full((E,), N // E).cumsum(0).to(torch.int32)
x = torch.randn(N, H)
def step():
    w1.grad = w2.grad = None
    a, b = torch._grouped_mm(x, w1, offs=offs).chunk(2, -1)
    out = torch._grouped_mm((F.silu(a) * b).contiguous(), w2, offs=offs)
    out.backward(torch.ones_like(out))
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(host_memory._mallopt() is None, reason="needs glibc's mallopt")
def test_keep_freed_memory_stops_most_page_faults_of_a_repeated_training_step():
    import os
    import subprocess
    import sys

    faults = {}
    for mode in ("default", "keep"):  # fresh processes: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    # Measured: about 25,000 faults per step by default (every weight-gradient page, every step),
    # about 5,000 with the setting.
    assert faults["default"] >= 10_000, faults
    assert faults["keep"] <= faults["default"] // 2, faults
