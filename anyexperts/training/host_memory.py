"""Hands the C heap's free pages back to the operating system after the parts of a step that
allocate the most on the host (validation, checkpoint saves).

    from anyexperts.training import host_memory
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
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def trim() -> bool:
    function = _malloc_trim()
    return bool(function(0)) if function is not None else False
