"""Hands the C heap's free pages back to the operating system after the parts of a step that
allocate the most on the host (validation, checkpoint saves).

    from anyexperts.training import host_memory
    host_memory.keep_freed_memory()   # at start: no per-step unmapping of large freed blocks
    host_memory.trim()          # True when glibc released memory; False elsewhere (musl, macOS)

Why: glibc keeps freed small blocks in its arenas. A long CPU run's resident memory then
creeps up with the transient allocations of validation and saves (a worker of a 2,000-step
run grew 563 -> 595 MiB over its first 400 steps and stayed there; docs/RESULTS.md), which reads as
a leak in a memory budget and is taken from the page cache of the node. malloc_trim(0)
returns those pages; it costs well under a millisecond when there is little to return.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc_function(name: str, restype, *argtypes):
    """A glibc function by name with its C signature, or None where the C library lacks it."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


def _malloc_trim():
    return _libc_function("malloc_trim", ctypes.c_int, ctypes.c_size_t)


def _mallopt():
    return _libc_function("mallopt", ctypes.c_int, ctypes.c_int, ctypes.c_int)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Keeps freed heap memory in the process for the next step instead of handing it back at once.

    glibc gives every block over 32 MiB its own mmap and unmaps it on free, and returns the top
    of the heap once more than the trim threshold is free; each page handed back faults again
    (and is zeroed by the kernel) when the next step touches it. A step that frees and
    reallocates the same large buffers, as a training step does (the stacked weight gradients
    of 64 experts at hidden 256, FFN 512 are 64 + 32 MiB), then pays a page fault per 4 KiB
    every step: 25,000 faults in a 109 ms MoE layer step on this project's CPU machine, where
    megatron's per-expert layer had 8 (docs/RESULTS.md). This call stops glibc from mmapping
    blocks and from trimming the heap on its own: in that step the faults fell to none, in
    tests/test_host_memory.py's step of the same experts from about 25,000 to about 5,000 (the
    rest not found; a lone 64 MiB block freed and allocated again still faults every time).
    trim() still returns free memory on demand (the trainer calls it after validation and
    checkpoint saves). Returns True when glibc took both settings; False elsewhere (musl,
    macOS), where nothing changes.
    """
    function = _mallopt()
    if function is None:
        return False
    return bool(function(_M_MMAP_MAX, 0)) & bool(function(_M_TRIM_THRESHOLD, 2**31 - 1))


def trim() -> bool:
    function = _malloc_trim()
    return bool(function(0)) if function is not None else False
