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
