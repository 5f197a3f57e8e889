"""Stop, resume and reshard real training runs through the entry point (torchrun, gloo, CPU).

One uninterrupted 2-process run (EP=2, 6 steps, checkpoints at steps 3 and 6) is the
reference. Against it:
- SIGTERM sent to the torchrun agent mid-run: the workers save a checkpoint, rank 0 runs
  the (fake) `scontrol requeue`, and the resumed run reproduces every later loss and
  validation loss exactly;
- its step-3 checkpoint resumed in one process (EP=1, DP=1, optimizer state resharded)
  gives the same losses and validation loss within 1e-5;
- its step-6 checkpoint evaluated by 4 processes (EP=4, DP=4) gives the same validation loss;
- a stop signal in a plain process exits with code 75 after its checkpoint;
- an error injected on rank 1 ends the whole torchrun job with rank 1's traceback.

    pytest tests/test_resume.py        # about 4 minutes on 2 busy cores
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = ["experiment=shakespeare_cpu", "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64",
          "moe.expert_ffn_hidden_size=64", "trainer.max_steps=6", "trainer.eval_interval=3",
          "trainer.eval_iters=1", "optim.warmup_steps=2", "logging.log_interval=1", "logging.tensorboard=false",
          "checkpoint.interval=3", "checkpoint.keep_last=0"]
EXIT_STOPPED_ON_SIGNAL = 75


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "launcher.train"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               # Time the workers get to save after torchrun forwards SIGTERM (default 30 s).
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd: list[str], *, expect_rc: int = 0, env=None, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, (f"{' '.join(cmd)} exited {proc.returncode}, expected {expect_rc}:\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _by_step(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run appends to the same metrics.jsonl)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    _run([*_torchrun(2), *COMMON, f"experiment.run_dir={run_dir}"])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000006"]
    return run_dir


def test_sigterm_to_torchrun_checkpoints_requeues_and_resumes_exactly(reference, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    run_dir = tmp_path / "preempted"
    env = _env(PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    cmd = [*_torchrun(2), *COMMON, f"experiment.run_dir={run_dir}", "trainer.requeue_on_signal=true"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, f"run ended before its first step:\n{proc.stdout.read()[-5000:]}"
            assert time.monotonic() < deadline, "no step logged within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which forwards it to both workers
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torchrun re-raises the signal it got after its workers stop: exit 1, whatever theirs.
    assert proc.returncode != 0
    assert "SIGTERM received; checkpoint" in output, output[-5000:]
    stopped = (run_dir / "checkpoints" / "latest").read_text().strip()
    stop_step = int(stopped.removeprefix("step_"))
    assert 1 <= stop_step < 6, f"the run was not stopped mid-run ({stopped})"
    assert (run_dir / "checkpoints" / stopped / "anyexperts_manifest.json").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert calls.read_text().split("\n")[0] == "requeue 4242"

    resumed = _run([*_torchrun(2), *COMMON, f"experiment.run_dir={run_dir}"])
    assert f"resumed from {run_dir / 'checkpoints' / stopped}" in resumed.stdout + resumed.stderr
    expected, got = _by_step(reference), _by_step(run_dir)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, (step, got[step]["loss"], expected[step]["loss"])
        assert got[step]["lr"] == expected[step]["lr"]
        assert got[step]["consumed_samples"] == expected[step]["consumed_samples"]
        if "val_loss" in expected[step]:
            assert abs(got[step]["val_loss"] - expected[step]["val_loss"]) <= 1e-6, step


def test_reshard_ep2_to_ep1_resumes_training_with_optimizer_state(reference, tmp_path):
    run_dir = tmp_path / "ep1"
    out = _run([sys.executable, "-m", "launcher.train", *COMMON, "parallel.expert_model_parallel_size=1",
                f"experiment.run_dir={run_dir}", f"checkpoint.resume={reference / 'checkpoints' / 'step_0000003'}"])
    log = out.stdout + out.stderr
    assert "resharding" in log and "resumed from" in log and "optimizer state not loaded" not in log, log[-3000:]
    expected, got = _by_step(reference), _by_step(run_dir)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        # Other summation orders (1 rank instead of 2): equal up to float rounding.
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-5, step
    assert abs(got[6]["val_loss"] - expected[6]["val_loss"]) <= 1e-5


def test_reshard_ep2_to_ep4_gives_the_same_validation_loss(reference, tmp_path):
    run_dir = tmp_path / "ep4"
    # DP=4 needs micro-batches of 4 for the global batch of 16; the samples are the same.
    _run([*_torchrun(4), *COMMON, "parallel.expert_model_parallel_size=4", "trainer.micro_batch_size=4",
          "trainer.eval_only=true", f"experiment.run_dir={run_dir}",
          f"checkpoint.resume={reference / 'checkpoints'}"])
    (record,) = _by_step(run_dir).values()
    assert record["step"] == 6 and record["eval_only"] is True
    assert abs(record["val_loss"] - _by_step(reference)[6]["val_loss"]) <= 1e-5


def test_stop_signal_exits_75_after_a_checkpoint(tmp_path):
    run_dir = tmp_path / "stopped"
    out = _run([sys.executable, "-m", "launcher.train", *COMMON, "parallel.expert_model_parallel_size=1",
                "trainer.max_steps=3", "trainer.debug_signal_at_step=1", f"experiment.run_dir={run_dir}"],
               expect_rc=EXIT_STOPPED_ON_SIGNAL)
    assert "stopping after step 1: SIGTERM received" in out.stdout + out.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert sorted(_by_step(run_dir)) == [1]


def test_failure_on_one_rank_ends_the_job_with_its_traceback(tmp_path):
    out = _run([*_torchrun(2), *COMMON, "trainer.debug_fail_at_step=1", f"experiment.run_dir={tmp_path / 'crash'}"],
               expect_rc=1, timeout=300)
    report = out.stdout + out.stderr
    root_cause = report[report.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "failure injected on rank 1" in root_cause, root_cause
