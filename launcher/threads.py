"""How many CPU threads each rank's torch uses, and why.

    from launcher.threads import apply_thread_count
    print(apply_thread_count(rank=0, processes_per_task=1))   # "rank 0: 8 torch threads (SLURM_CPUS_PER_TASK=8)"

torch starts as many intra-op threads as the machine has cores, in every rank. Slurm gives
each task SLURM_CPUS_PER_TASK CPUs; without task pinning (task/none, or no cgroups) every
rank would still start one thread per core of the node, and N ranks on one node would run
N times too many threads. So, first match wins:
  1. OMP_NUM_THREADS, when set: the user's (or torchrun's, or the batch script's) choice;
  2. SLURM_CPUS_PER_TASK, divided among the processes of the task (torchrun's workers
     share their srun task's CPUs; one srun task per rank shares nothing);
  3. torch's default.
The count is also exported as OMP_NUM_THREADS, so that processes this rank starts
(DataLoader workers) follow it.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional


def choose_thread_count(environ: MutableMapping[str, str], *, processes_per_task: int) -> tuple[Optional[int], str]:
    """(threads, where the number comes from); threads is None when torch's default applies."""
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ValueError(f"OMP_NUM_THREADS={omp!r} is not a positive integer; unset it (each rank then uses "
                             f"SLURM_CPUS_PER_TASK threads under Slurm) or set e.g. OMP_NUM_THREADS=4")
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cpus = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if cpus:
        if not cpus.isdigit() or int(cpus) < 1:
            raise ValueError(f"SLURM_CPUS_PER_TASK={cpus!r} is not a positive integer; submit with "
                             f"--cpus-per-task=<N>, or set OMP_NUM_THREADS to choose the threads per rank")
        per_process = max(1, int(cpus) // max(1, processes_per_task))
        shared = f" shared by {processes_per_task} processes" if processes_per_task > 1 else ""
        return per_process, f"SLURM_CPUS_PER_TASK={cpus}{shared}"
    return None, "torch's default; neither OMP_NUM_THREADS nor SLURM_CPUS_PER_TASK is set"


def apply_thread_count(*, rank: int, processes_per_task: int,
                       environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Sets torch's thread count for this process; returns the line to print at start."""
    import torch

    env = os.environ if environ is None else environ
    threads, source = choose_thread_count(env, processes_per_task=processes_per_task)
    if threads is not None:
        torch.set_num_threads(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    return f"rank {rank}: {torch.get_num_threads()} torch threads ({source})"
