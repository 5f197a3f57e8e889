"""The one spawn harness every multi-process test uses: N gloo ranks on this machine.

    results = run_distributed(fn, world_size=2, args=(x,), expert_parallel_size=2)

`fn(rank, world_size, *args)` runs in each spawned rank after torch.distributed (gloo)
and, when expert_parallel_size is given, megatron's parallel_state are set up, with the
CPU patches applied. Its return value (picklable; tensors are fine) comes back in rank
order. A rank that raises fails the whole call with that rank's traceback; a rank that
hangs fails it after `timeout` seconds.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a queue are shared by file descriptor, which dies with the rank's
    # process before the parent reads it; plain bytes outlive it.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank, world_size, port, fn, args, expert_parallel_size, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from anyexperts import cpu_support

        cpu_support.apply()
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        if expert_parallel_size is not None:
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel_size)
        queue.put((rank, True, _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # report any failure, including asserts, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if expert_parallel_size is not None:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *, args: tuple = (),
                    expert_parallel_size: Optional[int] = None, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, expert_parallel_size, queue))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [results[r] for r in range(world_size)]
