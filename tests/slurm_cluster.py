"""Talking to the local one-node Slurm cluster of slurm/local_cluster.sh from tests.

    cluster = LocalCluster.start_or_skip()       # skips when Slurm cannot be had here
    job_id = submit(["slurm/pretrain_srun.sbatch", "experiment=..."], env=..., sbatch_args=[...])
    info = wait_until_done(job_id)               # scontrol's fields, e.g. info["JobState"]
    cluster.stop_if_started()

There is no accounting database: a finished job is known to `scontrol show job` for
MinJobAge seconds (600 in the generated slurm.conf), which outlasts every test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO_ROOT / "slurm" / "local_cluster.sh"
# local_cluster.sh's exit status when Slurm cannot be installed or run here (no root, no apt).
EXIT_UNAVAILABLE = 69
# How long one job start may take, imports of 2 ranks on 2 busy cores included.
JOB_TIMEOUT_S = float(os.environ.get("ANYEXPERTS_SLURM_JOB_TIMEOUT_S", "300"))
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")


def run_quiet(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


class LocalCluster:
    """The cluster as the test session found it: stop_if_started() leaves a user's cluster running."""

    def __init__(self, started_here: bool) -> None:
        self.started_here = started_here

    @classmethod
    def start_or_skip(cls) -> "LocalCluster":
        if os.geteuid() != 0:
            pytest.skip("the local Slurm cluster needs root (apt-get, daemons with SlurmUser=root); "
                        "run as root, e.g. in CI")
        if run_quiet(["bash", str(LOCAL_CLUSTER), "status"]).returncode == 0:
            return cls(started_here=False)
        started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=900)
        if started.returncode == EXIT_UNAVAILABLE:
            pytest.skip(f"no Slurm on this machine: {started.stderr.strip()}")
        assert started.returncode == 0, f"slurm/local_cluster.sh start failed:\n{started.stdout}{started.stderr}"
        return cls(started_here=True)

    @staticmethod
    def stop() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True, text=True, timeout=300)

    def stop_if_started(self) -> None:
        if self.started_here:
            stopped = self.stop()
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def running_daemons() -> dict[str, list[int]]:
    """Slurm and munge processes of this machine, by name (only to look; nothing is killed)."""
    found = {}
    for name in DAEMONS:
        pids = run_quiet(["pgrep", "-x", name]).stdout.split() if shutil.which("pgrep") else []
        if pids:
            found[name] = [int(pid) for pid in pids]
    return found


def job_env(run_root: Path, **extra: str) -> dict[str, str]:
    """What the tests submit with: this environment without OMP_NUM_THREADS (so that the ranks
    take SLURM_CPUS_PER_TASK) or another job's Slurm variables, runs under run_root."""
    env = {key: value for key, value in os.environ.items()
           if not re.match(r"^(SLURM_|SRUN_|SBATCH_|OMP_NUM_THREADS$|MASTER_ADDR$|MASTER_PORT$|RUN_DIR$|RUN_NAME$)",
                           key)}
    env.update(RUN_ROOT=str(run_root), **extra)
    return env


def submit(script_and_args: list[str], *, env: dict[str, str], sbatch_args: list[str]) -> str:
    """sbatch from the repository root; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *sbatch_args, *script_and_args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sbatch failed: {done.stderr}"
    return done.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job <id>` as a dict (JobState, Restarts, ExitCode, ...)."""
    shown = run_quiet(["scontrol", "show", "job", job_id])
    assert shown.returncode == 0, f"scontrol show job {job_id}: {shown.stderr}"
    info: dict[str, str] = {}
    for line in shown.stdout.splitlines():
        line = line.strip()
        # One field per line whose value has spaces (the script and its Hydra overrides).
        if line.startswith(("Command=", "Comment=")):
            key, value = line.split("=", 1)
            info[key] = value
            continue
        key = None
        for token in line.split(" "):
            if "=" in token:
                key, value = token.split("=", 1)
                info[key] = value
            elif key:
                info[key] += " " + token
    return info


def wait_for(job_id: str, condition: Callable[[dict[str, str]], bool], what: str,
             timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if condition(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: not {what} after {timeout:.0f}s; scontrol says {info}")
        time.sleep(1)


def wait_until_done(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    return wait_for(job_id, lambda info: info["JobState"] in FINISHED_STATES, "finished", timeout)


# Seconds between the first start's last process and lifting the begin time (below).
REVOKE_MARGIN_S = 2.0


def job_steps_on_node(job_id: str) -> list[str]:
    """The slurmstepd processes of a job still on this node ("slurmstepd: [63.0]", "[63.batch]")."""
    if not shutil.which("pgrep"):
        return []
    found = run_quiet(["pgrep", "-a", "-f", rf"^slurmstepd: \[{job_id}\."]).stdout
    return found.splitlines()


def start_requeued_now(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Waits for the requeue, then lifts the begin time Slurm gives a requeued job (about
    two minutes ahead), so that it starts again at once.

    Restarts counts the requeue as soon as it is asked for, while the first start's processes
    may still be ending (RUNNING or COMPLETING), and the begin time is set only when they
    have: so only a job seen PENDING after its requeue, and then no longer, has restarted.

    The begin time is lifted only once the first start's step daemons have left the node, and
    REVOKE_MARGIN_S later. Slurm's own delay is there for this: slurmd revokes the killed
    start's job credential with a time in whole seconds, and refuses a new start whose
    credential was made in that same second ("Job credential revoked", the job then FAILED
    with exit 1). Lifting it at once failed about 1 run in 6 on the local cluster.
    """
    deadline = time.monotonic() + timeout
    seen_pending = False
    while True:
        info = job_info(job_id)
        restarts = int(info.get("Restarts", "0"))
        if restarts >= 1 and info["JobState"] == "PENDING":
            if not seen_pending:
                while job_steps_on_node(job_id) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(REVOKE_MARGIN_S)
            seen_pending = True
            run_quiet(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        elif seen_pending:
            return info
        elif info["JobState"] in FINISHED_STATES:
            raise AssertionError(f"job {job_id} ended without being requeued: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} was not requeued and restarted after {timeout:.0f}s: {info}")
        time.sleep(1)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The training loss of every logged step in <run_dir>/metrics.jsonl; each step once."""
    losses: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if "loss" in record and "event" not in record:
            assert record["step"] not in losses, f"step {record['step']} was trained twice in {run_dir}"
            losses[record["step"]] = record["loss"]
    return losses


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float = JOB_TIMEOUT_S) -> None:
    """Until rank 0 has logged `step` (or the job ends first, which fails)."""
    deadline = time.monotonic() + timeout
    while max(losses_by_step(run_dir), default=0) < step:
        info = job_info(job_id)
        if info["JobState"] in FINISHED_STATES:
            raise AssertionError(f"job {job_id} ended before step {step}: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not reach step {step} in {timeout:.0f}s: {info}")
        time.sleep(0.5)


def text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} does not exist>"

