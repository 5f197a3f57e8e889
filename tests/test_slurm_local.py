"""The batch scripts and the submitit sweep on a real one-node Slurm cluster (slurm/local_cluster.sh).

    pytest -m slurm tests/test_slurm_local.py      # as root; 9 min on 2 cores that other jobs kept busy

The session fixture starts the cluster (installing Slurm with apt-get when it is missing)
and stops it again, unless it was running already. Without root, apt or Slurm the tests
are skipped, saying why. Every job is a tiny CPU run: 2 ranks (EP=2) on the node's 2 CPUs.
- both templates run a job to completion in runs/<name>/slurm-<jobid>, logs where
  slurm/README.md says;
- time limit: USR1 to the batch shell -> SIGTERM to the ranks -> checkpoint -> requeue ->
  resume, with the same losses step for step as the uninterrupted srun job;
- preemption (SIGTERM to the batch shell and every rank) with trainer.requeue_on_signal:
  rank 0 requeues, the job resumes with the same losses;
- a rank failing mid-run ends the job (--kill-on-bad-exit): FAILED, the error in its log;
- a two-point Hydra sweep through the submitit launcher, one run directory per point.
What one node cannot show (several nodes) is covered with faked commands in
tests/test_slurm_templates.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.slurm_cluster import (FINISHED_STATES, JOB_TIMEOUT_S, REPO_ROOT, LocalCluster, job_env, job_info,
                                 losses_by_step, running_daemons, start_requeued_now, submit, text_of, wait_for_step,
                                 wait_until_done)

pytestmark = pytest.mark.slurm

TINY = ["experiment=shakespeare_cpu", "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64",
        "moe.expert_ffn_hidden_size=64", "trainer.eval_iters=1", "optim.warmup_steps=2", "logging.log_interval=1",
        "logging.tensorboard=false", "trainer.pictures_at_end=false", "trainer.routing_trace_at_end=false"]
# The job that the interrupted ones are compared with: long enough that a signal sent after
# step 3 arrives well before the end, even on busy cores.
RESUME_STEPS = 30
RESUME_RUN = TINY + [f"trainer.max_steps={RESUME_STEPS}", f"trainer.eval_interval={RESUME_STEPS}"]
SIGNAL_AFTER_STEP = 3
# Pattern (b) on one node: a task per rank, one CPU each, no GPUs (the templates ask for 8).
SRUN_TASKS = ["-N1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=00:15:00"]
TORCHRUN_TASK = ["-N1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=00:15:00"]


@pytest.fixture(scope="session")
def local_slurm():
    cluster = LocalCluster.start_or_skip()
    yield cluster
    cluster.stop_if_started()


class Job:
    """A submitted batch job of a test, with the places its files go."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.id = ""
        (root / "slurm-logs").mkdir(parents=True, exist_ok=True)

    def submit(self, script: str, sbatch_args: list[str], overrides: list[str], **env: str) -> "Job":
        self.id = submit([f"slurm/{script}", *overrides], env=job_env(self.root / "runs", PYTHON=sys.executable, **env),
                         sbatch_args=[f"--job-name={self.name}", f"--output={self.root}/slurm-logs/%x-%j.out",
                                      *sbatch_args])
        return self

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.name / f"slurm-{self.id}"

    @property
    def batch_log(self) -> str:
        return text_of(self.root / "slurm-logs" / f"{self.name}-{self.id}.out")

    def log(self, name: str) -> str:
        return text_of(self.run_dir / "logs" / name)

    def logs(self) -> str:
        """Everything the job wrote, for assertion messages."""
        per_rank = "".join(f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                           for path in sorted((self.run_dir / "logs").glob("*.log")))
        return f"--- batch shell\n{self.batch_log[-3000:]}{per_rank}"


@pytest.fixture
def cancel_leftover_jobs():
    """Jobs a failing test leaves in the queue would hold the node's CPUs for the next tests."""
    jobs: list[Job] = []
    yield jobs
    for job in jobs:
        if job.id:
            subprocess.run(["scancel", job.id], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def srun_reference(local_slurm, tmp_path_factory):
    """The srun template's job, uninterrupted: what the resumed jobs must reproduce."""
    job = Job(tmp_path_factory.mktemp("srun_reference"), "reference").submit("pretrain_srun.sbatch", SRUN_TASKS,
                                                                            RESUME_RUN)
    try:
        info = wait_until_done(job.id)
    finally:
        subprocess.run(["scancel", job.id], capture_output=True, timeout=60)
    return job, info


def test_local_cluster_stops_without_leftovers_and_starts_again(local_slurm):
    if not local_slurm.started_here:
        pytest.skip("the cluster was running before the tests; they do not stop someone else's cluster")
    stopped = LocalCluster.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert running_daemons() == {}
    status = subprocess.run(["bash", "slurm/local_cluster.sh", "status"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 3 and "slurmctld: not running" in status.stdout
    again = LocalCluster.stop()
    assert again.returncode == 0, "stop of a stopped cluster is a no-op"
    for _ in range(2):  # the second start finds everything running and changes nothing
        started = subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "is idle" in started.stdout
    assert "starting" not in started.stdout and "wrote" not in started.stdout
    assert set(running_daemons()) >= {"munged", "slurmctld", "slurmd"}


def test_srun_template_runs_to_completion_with_a_log_per_rank(srun_reference):
    job, info = srun_reference
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.logs()
    assert job.run_dir.name == f"slurm-{job.id}" and (job.run_dir / "config.yaml").exists()
    assert sorted(losses_by_step(job.run_dir)) == list(range(1, RESUME_STEPS + 1))
    assert "threads per rank: 1 (SLURM_CPUS_PER_TASK=1 for 1 rank(s) per task)" in job.batch_log
    for rank in (0, 1):
        assert f"rank {rank}: 1 torch threads (OMP_NUM_THREADS=1)" in job.log(f"rank-{rank}.log"), job.logs()
    assert f"done: {RESUME_STEPS} steps" in job.log("rank-0.log")


def test_torchrun_template_runs_to_completion_with_node_and_rank_logs(local_slurm, tmp_path, cancel_leftover_jobs):
    job = Job(tmp_path, "torchrun").submit("pretrain_torchrun.sbatch", TORCHRUN_TASK,
                                           TINY + ["trainer.max_steps=4", "checkpoint.save_at_end=false"],
                                           GPUS_PER_NODE="2")
    cancel_leftover_jobs.append(job)
    info = wait_until_done(job.id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.logs()
    assert "threads per rank: 1 (SLURM_CPUS_PER_TASK=2 for 2 rank(s) per task)" in job.batch_log
    # Local rank 0 on the node's console log; every rank in torchrun's own files.
    assert "done: 4 steps" in job.log("node-0.log"), job.logs()
    rank_logs = sorted((job.run_dir / "logs" / "torchrun").rglob("stdout.log"))
    assert len(rank_logs) == 2, job.logs()
    every_rank = "".join(path.read_text() for path in rank_logs)
    for rank in (0, 1):
        assert f"rank {rank}: 1 torch threads (OMP_NUM_THREADS=1)" in every_rank


def assert_resumed_like_the_reference(job: Job, info: dict[str, str], srun_reference) -> None:
    reference, reference_info = srun_reference
    assert reference_info["JobState"] == "COMPLETED", reference.logs()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.logs()
    batch_log = job.batch_log
    assert "start 1:" in batch_log and "start 2:" in batch_log, job.logs()
    rank0 = job.log("rank-0.log")
    stopped_at = [int(line.split("stopping after step ")[1].split(":")[0])
                  for line in rank0.splitlines() if "stopping after step " in line]
    assert len(stopped_at) == 1 and SIGNAL_AFTER_STEP <= stopped_at[0] < RESUME_STEPS, job.logs()
    assert re.search(rf"resumed from \S+/step_{stopped_at[0]:07d}\b", rank0), "resumed from that checkpoint"
    # The same job id, so the same run directory, trained every step once with the same losses.
    assert losses_by_step(job.run_dir) == losses_by_step(reference.run_dir)


def test_time_limit_signal_checkpoints_requeues_and_resumes_with_the_same_losses(
        srun_reference, tmp_path, cancel_leftover_jobs):
    job = Job(tmp_path, "timelimit").submit("pretrain_srun.sbatch", SRUN_TASKS, RESUME_RUN)
    cancel_leftover_jobs.append(job)
    wait_for_step(job.run_dir, job.id, SIGNAL_AFTER_STEP)
    # What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=60)
    start_requeued_now(job.id)
    info = wait_until_done(job.id)
    assert "time limit near" in job.batch_log and f"requeueing job {job.id}" in job.batch_log, job.logs()
    # Every rank exits 75 after the checkpoint, not killed by srun when the first one has.
    assert "step exited with status 75" in job.batch_log, job.logs()
    assert_resumed_like_the_reference(job, info, srun_reference)


def test_preemption_with_trainer_requeue_resumes_with_the_same_losses(srun_reference, tmp_path,
                                                                      cancel_leftover_jobs):
    job = Job(tmp_path, "preempted").submit("pretrain_srun.sbatch", SRUN_TASKS, RESUME_RUN,
                                            EXTRA_OVERRIDES="trainer.requeue_on_signal=true", REQUEUE_FROM_BATCH="0")
    cancel_leftover_jobs.append(job)
    wait_for_step(job.run_dir, job.id, SIGNAL_AFTER_STEP)
    # What preemption sends first: SIGTERM to every task of the job and to the batch shell.
    # Not `scancel --full`: that signals srun too, which then ends the step at once, and the
    # ranks were killed (137) before their checkpoint when tried.
    subprocess.run(["scancel", "--signal=TERM", job.id], check=True, timeout=60)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job.id], check=True, timeout=60)
    start_requeued_now(job.id)
    info = wait_until_done(job.id)
    assert f"requeued Slurm job {job.id}" in job.log("rank-0.log"), job.logs()
    assert "requeueing job" not in job.batch_log, "requeued once, by rank 0, not by the batch shell too"
    assert_resumed_like_the_reference(job, info, srun_reference)


def test_a_failing_rank_ends_the_job_as_failed_with_its_error_in_its_log(local_slurm, tmp_path,
                                                                         cancel_leftover_jobs):
    job = Job(tmp_path, "crash").submit("pretrain_srun.sbatch", SRUN_TASKS,
                                        RESUME_RUN + ["trainer.debug_fail_at_step=2"])
    cancel_leftover_jobs.append(job)
    error = "trainer.debug_fail_at_step=2: failure injected on rank 1"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while error not in job.log("rank-1.log"):
        assert time.monotonic() < deadline and job_info(job.id)["JobState"] not in FINISHED_STATES, job.logs()
        time.sleep(0.5)
    # Without --kill-on-bad-exit rank 0 would wait in its next collective for
    # parallel.timeout_minutes; srun ends it within seconds.
    info = wait_until_done(job.id, timeout=90)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", job.logs()
    assert "Traceback" in job.log("rank-1.log")
    assert "done:" not in job.log("rank-0.log")
    assert int(info["Restarts"]) == 0, "a crash is not requeued"


def test_submitit_sweep_runs_each_point_as_a_job_in_its_own_run_dir(local_slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is the optional extra: pip install -e '.[slurm]'")
    sweep = subprocess.run(
        [sys.executable, "-m", "launcher.train", "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={tmp_path}/multirun",
         f"experiment.run_root={tmp_path}/runs", "experiment.name=sweep", *TINY,
         "parallel.expert_model_parallel_size=1", "trainer.max_steps=3", "checkpoint.save_at_end=false",
         "optim.lr=1e-3,2e-3"],
        cwd=REPO_ROOT, env=job_env(tmp_path / "runs"), capture_output=True, text=True, timeout=600)
    submitit_logs = "".join(path.read_text(errors="replace")
                            for path in sorted((tmp_path / "multirun").rglob("*_log.out")))
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:] + submitit_logs[-3000:]
    run_dirs = sorted((tmp_path / "runs" / "sweep").glob("slurm-*"))
    assert len(run_dirs) == 2, run_dirs
    learning_rates = {OmegaConf.load(run_dir / "config.yaml").optim.lr for run_dir in run_dirs}
    assert learning_rates == {1e-3, 2e-3}
    for run_dir in run_dirs:
        assert sorted(losses_by_step(run_dir)) == [1, 2, 3]
    # No batch script sets OMP_NUM_THREADS here: the rank takes --cpus-per-task itself.
    assert submitit_logs.count("rank 0: 1 torch threads (SLURM_CPUS_PER_TASK=1)") == 2, submitit_logs[-3000:]
