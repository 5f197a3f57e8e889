"""Rank discovery for every way this project is started, and the one torch.distributed init.

    from launcher.bootstrap import discover, init_process_group
    env = discover()                     # torchrun, srun, mpirun or a plain `python`
    init_process_group(env, backend="auto", timeout_minutes=10)

`discover()` only reads the environment (and, under mpirun, talks over MPI); it creates no
torch process group. `init_process_group()` exports the torch.distributed variables and
creates the group, a world of 1 included, because megatron-core needs one.

Self-test, one line per rank (`rank=R world=W sum=S launcher=L`):

    python -m launcher.bootstrap --selftest
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m launcher.bootstrap --selftest
    mpirun -np 2 --bind-to none python -m launcher.bootstrap --selftest   # as root: --allow-run-as-root --oversubscribe
    srun --ntasks-per-node=4 python -m launcher.bootstrap --selftest      # inside an allocation

`python -m launcher.bootstrap --print` prints what discover() finds and starts nothing.

Precedence of discover(), first match wins:
  (a) torchrun or an explicit environment: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT all
      set. LOCAL_RANK / LOCAL_WORLD_SIZE are read when set; without them one node is assumed.
      RANK or WORLD_SIZE set without the other three is an error rather than a silent world
      of 1, since that would leave the other ranks waiting.
  (b) srun: SLURM_PROCID and SLURM_NTASKS (or SLURM_STEP_NUM_TASKS), *and* a job step
      (SLURM_STEP_ID / SLURM_STEPID).
      The batch shell of an sbatch job also carries SLURM_NTASKS (the task count of the
      whole job) and, on many Slurm versions, SLURM_PROCID=0, but it is one process, not
      task 0 of N: treating it as rank 0 of N would wait forever for ranks nobody started.
      Only srun makes a step, so a missing step id, or one of the ids Slurm reserves for the
      batch / extern / interactive step (>= 0xFFFFFFF0, or non-numeric), falls through.
      Second exception: mpirun inside an allocation starts one daemon per node with srun,
      so its ranks inherit the daemon step's SLURM_PROCID / SLURM_NTASKS (node index, node
      count). When an MPI launcher's world size (OMPI_COMM_WORLD_SIZE, PMI_SIZE,
      MV2_COMM_WORLD_SIZE) is set and differs from Slurm's task count, MPI wins.
      MASTER_ADDR = MASTER_ADDR if set, else the first host of SLURM_STEP_NODELIST (or
      SLURM_JOB_NODELIST); MASTER_PORT = MASTER_PORT if set, else 10000 + job id % 20000,
      so every task of a job agrees without talking, and two jobs sharing a head node
      almost never collide.
  (c) mpirun / mpiexec: OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK or MV2_COMM_WORLD_SIZE with
      a world size > 1. mpi4py is imported only here. Rank and size come from COMM_WORLD;
      local rank = number of lower ranks on the same host; rank 0 picks the address
      (127.0.0.1 when every rank shares its host, else its hostname; MASTER_ADDR wins if
      set) and a free port (or MASTER_PORT) and broadcasts them.
  (d) otherwise one process: rank 0 of 1 at 127.0.0.1 (or MASTER_ADDR) on a free port (or
      MASTER_PORT).

MPI and process exit. Importing mpi4py.MPI calls MPI_Init_thread, and mpi4py registers
MPI_Finalize to run at interpreter exit. Two consequences: (1) destroy the torch process
group before the interpreter exits (the self-test does) so that finalize does not run
under live gloo/NCCL threads; (2) a rank that dies from an exception while the others sit
in a collective would leave mpirun waiting forever, so on the MPI path discover() installs
an excepthook that prints the traceback and calls COMM_WORLD.Abort(1), as
`python -m mpi4py` does, and mpirun then ends every rank. Open MPI pins each rank to one
core by default: pass `--bind-to none` (or a wider --map-by) for training so torch's
threads are not squeezed onto one core. fork() after MPI_Init (DataLoader workers) is unsafe
with some MPI transports; keep num_workers=0 or use the spawn start method under mpirun.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping, Optional

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Every MPI launcher we know sets one of these; PMIX_RANK alone carries no world size.
MPI_SIZE_KEYS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
MPI_MARKER_KEYS = MPI_SIZE_KEYS + ("PMIX_RANK",)
# slurm.h: ids from SLURM_MAX_NORMAL_STEP_ID up name the batch, extern, interactive and
# pending steps, none of which is an srun step.
SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000
MPI_INSTALL_HINT = "pip install -e '.[mpi]'"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and where rank 0's TCP store listens."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS: which branch of discover() produced this

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r}; use one of {LAUNCHERS}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank={self.rank} world_size={self.world_size}: need 0 <= rank < world_size; "
                "check RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) of the launch"
            )
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise ValueError(
                f"local_rank={self.local_rank} local_world_size={self.local_world_size} "
                f"world_size={self.world_size}: need 0 <= local_rank < local_world_size <= world_size; "
                "check LOCAL_RANK/LOCAL_WORLD_SIZE (or SLURM_LOCALID/SLURM_STEP_TASKS_PER_NODE)"
            )
        if not self.master_addr:
            raise ValueError("master_addr is empty; set MASTER_ADDR to rank 0's host")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port} is not a TCP port; set MASTER_PORT in 1..65535")


# ----------------------------------------------------------------------------- public API


def discover(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Finds this process's rank from the launcher's environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    for branch in (_from_torchrun, _from_slurm, _from_mpi):
        found = branch(env)
        if found is not None:
            return found
    return _single_process(env)


def export_env(env: DistEnv, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Sets the variables `torch.distributed.init_process_group(init_method="env://")` reads."""
    target = os.environ if environ is None else environ
    target.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def init_process_group(env: DistEnv, backend: str, timeout_minutes: float) -> str:
    """Creates the default torch process group for `env`; returns the backend used.

    backend "auto" means nccl with CUDA, else gloo. The timeout bounds the rendezvous and
    every collective, so a missing or stuck rank becomes an error instead of a hang.
    """
    import torch
    import torch.distributed as dist

    if timeout_minutes <= 0:
        raise ValueError(f"timeout_minutes={timeout_minutes}; give a positive number of minutes")
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised; call init_process_group once per process "
            "(or torch.distributed.destroy_process_group() first)"
        )
    resolved = resolve_backend(backend, cuda_available=torch.cuda.is_available())
    export_env(env)
    if torch.cuda.is_available():
        # Before the group exists, so that NCCL binds this rank to its own GPU.
        torch.cuda.set_device(cuda_device_index(env.local_rank, torch.cuda.device_count()))
    dist.init_process_group(
        backend=resolved,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return resolved


def resolve_backend(backend: str, *, cuda_available: bool) -> str:
    """"auto" -> nccl with CUDA else gloo; any other name is passed to torch unchanged."""
    if backend == "auto":
        return "nccl" if cuda_available else "gloo"
    if backend == "nccl" and not cuda_available:
        raise ValueError("backend=nccl needs CUDA, and none is available; use backend=auto or gloo")
    return backend


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a rank: its local rank, or 0 when the launcher gave it one GPU."""
    if device_count < 1:
        raise ValueError("no CUDA device is visible to this process; check CUDA_VISIBLE_DEVICES")
    if device_count == 1:
        # srun --gpus-per-task=1 / CUDA_VISIBLE_DEVICES per rank: the one device is ours.
        return 0
    if local_rank < device_count:
        return local_rank
    raise ValueError(
        f"local rank {local_rank} has no GPU: {device_count} are visible on this node. Start at most "
        f"{device_count} processes per node, or give each process its own GPU (srun --gpus-per-task=1)"
    )


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a Slurm hostlist: "node[01-03,07],gpu-a[1-2]" -> node01 node02 node03 node07 gpu-a1 gpu-a2.

    Zero padding follows the lower bound of a range ("08-11" -> 08 09 10 11); several
    bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    items = _split_top_level(hostlist.strip())
    if not items:
        raise ValueError(f"empty Slurm hostlist {hostlist!r}; check SLURM_JOB_NODELIST")
    hosts: list[str] = []
    for item in items:
        hosts.extend(_expand_host_pattern(item, hostlist))
    return hosts


def first_host(hostlist: str) -> str:
    """The first host of a Slurm hostlist: where rank 0 runs under srun's block distribution."""
    return expand_hostlist(hostlist)[0]


def slurm_master_port(job_id: str) -> int:
    """10000 + job id % 20000: the same on every task of a job, different for neighbour jobs."""
    if not job_id.strip().isdigit():
        raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a number; set MASTER_PORT explicitly")
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_STEP_TASKS_PER_NODE: "8(x2),4" -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot parse tasks-per-node {spec!r}; expected a form like '8(x2),4'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def find_free_port(host: str = "") -> int:
    """A TCP port free right now on this host (the OS may hand it out again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the branches


def _int_var(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer; fix or unset it") from None


def _from_torchrun(env: Mapping[str, str]) -> Optional[DistEnv]:
    missing = [key for key in TORCHRUN_KEYS if key not in env]
    if missing:
        if "RANK" in env or "WORLD_SIZE" in env:
            raise ValueError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} not: export all of "
                f"{', '.join(TORCHRUN_KEYS)} (torchrun does), or unset RANK and WORLD_SIZE so that "
                "Slurm, MPI or single-process discovery applies"
            )
        return None
    world_size = _int_var(env, "WORLD_SIZE")
    rank = _int_var(env, "RANK")
    # Without LOCAL_* (a hand-written environment) assume one node.
    local_world_size = _int_var(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank % local_world_size
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        master_addr=env["MASTER_ADDR"],
        master_port=_int_var(env, "MASTER_PORT"),
        launcher="torchrun",
    )


def _is_srun_step(step_id: Optional[str]) -> bool:
    if step_id is None or not step_id.strip().isdigit():
        return False  # absent: the batch shell; "batch"/"extern"/"interactive": not srun either
    return int(step_id) < SLURM_MAX_NORMAL_STEP_ID


def _mpi_world_size_from_env(env: Mapping[str, str]) -> Optional[int]:
    for key in MPI_SIZE_KEYS:
        if key in env:
            return _int_var(env, key)
    return None


def _from_slurm(env: Mapping[str, str]) -> Optional[DistEnv]:
    if "SLURM_PROCID" not in env or not ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return None
    if not _is_srun_step(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))):
        return None
    # srun exports the step's task count in both; the STEP one survives --preserve-env.
    world_size = _int_var(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    mpi_world_size = _mpi_world_size_from_env(env)
    if mpi_world_size is not None and mpi_world_size != world_size:
        return None  # mpirun inside the allocation: these SLURM_* describe its daemons
    if "SLURM_LOCALID" not in env:
        raise ValueError("SLURM_PROCID is set but SLURM_LOCALID is not; start the ranks with srun")
    local_rank = _int_var(env, "SLURM_LOCALID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = first_host(nodelist)
    else:
        raise ValueError("no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST; set MASTER_ADDR to rank 0's host")
    if env.get("MASTER_PORT"):
        master_port = _int_var(env, "MASTER_PORT")
    else:
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise ValueError("no SLURM_JOB_ID to derive a port from; set MASTER_PORT")
        master_port = slurm_master_port(job_id)
    return DistEnv(
        rank=_int_var(env, "SLURM_PROCID"),
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=_slurm_local_world_size(env, world_size),
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def _slurm_local_world_size(env: Mapping[str, str], world_size: int) -> int:
    tasks_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_index = env.get("SLURM_NODEID")
    if tasks_spec and node_index is not None and node_index.isdigit():
        counts = expand_tasks_per_node(tasks_spec)
        if int(node_index) < len(counts):
            return counts[int(node_index)]
    num_nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    if num_nodes and num_nodes.isdigit() and int(num_nodes) > 0:
        return -(-world_size // int(num_nodes))  # ceil: the fullest node
    return world_size


def _from_mpi(env: Mapping[str, str]) -> Optional[DistEnv]:
    if not any(key in env for key in MPI_MARKER_KEYS):
        return None
    size_from_env = _mpi_world_size_from_env(env)
    if size_from_env is not None and size_from_env <= 1:
        return None  # `mpirun -np 1`: one process, no need to initialise MPI at all
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            f"this process was started by an MPI launcher ({', '.join(k for k in MPI_MARKER_KEYS if k in env)} "
            f"set) but mpi4py is not installed; run `{MPI_INSTALL_HINT}` (or pip install mpi4py)"
        ) from err
    comm = MPI.COMM_WORLD
    if comm.Get_size() <= 1:
        return None
    _abort_job_on_uncaught_exception(comm)
    return _from_mpi_comm(comm, env, MPI.Get_processor_name())


def _from_mpi_comm(comm: Any, env: Mapping[str, str], hostname: str) -> DistEnv:
    rank, world_size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(hostname)
    local_rank = sum(1 for host in hosts[:rank] if host == hostname)
    if rank == 0:
        # One host: loopback always works. Several: rank 0's name, which the cluster resolves;
        # MASTER_ADDR (e.g. an InfiniBand interface's name) wins when the user sets it.
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hostname)
        port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else find_free_port()
        rendezvous = (addr, port)
    else:
        rendezvous = None
    master_addr, master_port = comm.bcast(rendezvous, root=0)
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=hosts.count(hostname),
        master_addr=master_addr,
        master_port=master_port,
        launcher="mpi",
    )


def _abort_job_on_uncaught_exception(comm: Any) -> None:
    """Turns one rank's crash into the end of the whole MPI job instead of a hang."""
    previous = sys.excepthook
    if getattr(previous, "_aborts_mpi_job", False):
        return

    def excepthook(exc_type, exc, tb):  # noqa: ANN001 - the sys.excepthook signature
        traceback.print_exception(exc_type, exc, tb)
        sys.stderr.flush()
        comm.Abort(1)

    excepthook._aborts_mpi_job = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _single_process(env: Mapping[str, str]) -> DistEnv:
    port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else find_free_port("127.0.0.1")
    return DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
        launcher="single",
    )


# ----------------------------------------------------------------------------- hostlists


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm hostlist {hostlist!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {hostlist!r}")
        elif char == "," and depth == 0:
            items.append(hostlist[start:index].strip())
            start = index + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {hostlist!r}")
    items.append(hostlist[start:].strip())
    if any(not item for item in items) and hostlist:
        raise ValueError(f"empty host name in Slurm hostlist {hostlist!r}")
    return [item for item in items if item]


def _expand_host_pattern(pattern: str, hostlist: str) -> list[str]:
    bracket = re.search(r"\[([^\[\]]*)\]", pattern)
    if bracket is None:
        return [pattern]
    prefix, suffix = pattern[: bracket.start()], pattern[bracket.end():]
    hosts: list[str] = []
    for value in _expand_ranges(bracket.group(1), hostlist):
        hosts.extend(_expand_host_pattern(prefix + value + suffix, hostlist))
    return hosts


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in Slurm hostlist {hostlist!r}; expected N or N-M")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in Slurm hostlist {hostlist!r}")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


# ----------------------------------------------------------------------------- command line


def _selftest(timeout_minutes: float) -> int:
    import torch
    import torch.distributed as dist

    env = discover()
    init_process_group(env, backend="gloo", timeout_minutes=timeout_minutes)
    try:
        total = torch.tensor([env.rank], dtype=torch.int64)
        dist.all_reduce(total)
        expected = env.world_size * (env.world_size - 1) // 2
        line = f"rank={env.rank} world={env.world_size} sum={int(total.item())} launcher={env.launcher}\n"
        # One write(2) of less than PIPE_BUF bytes: ranks sharing a pipe cannot split each other's line.
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), line.encode())
        if int(total.item()) != expected:
            print(f"rank={env.rank}: all_reduce gave {int(total.item())}, expected {expected}", file=sys.stderr)
            return 1
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.bootstrap", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--selftest", action="store_true", help="init gloo, all_reduce the ranks, print one line per rank")
    action.add_argument("--print", action="store_true", help="print what discover() finds; start nothing")
    parser.add_argument("--timeout-minutes", type=float, default=2.0, help="process-group timeout of the self-test")
    args = parser.parse_args(argv)
    if args.print:
        print(discover(), flush=True)
        return 0
    return _selftest(args.timeout_minutes)


if __name__ == "__main__":
    sys.exit(main())
