"""data.extra_validation through the entry point: the main experiment at EP=2 (torchrun, 2
processes) logs val_loss/canterbury on its validation steps, trains exactly as without it,
and a resumed run (EP=1, from the step-2 checkpoint) logs the same value at step 4.

    pytest tests/test_extra_validation_e2e.py     # about 2 minutes on 2 busy cores; the
                                                  # first run downloads brotli==1.1.0 (~7 MB)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = ["experiment=shakespeare_cpu", "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64",
          "moe.expert_ffn_hidden_size=64", "trainer.eval_interval=2", "trainer.eval_iters=1",
          "optim.warmup_steps=2", "logging.log_interval=1", "logging.tensorboard=false"]
EXTRA = ["data.extra_validation=[canterbury]", "data.extra_validation_batches=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(key, None)
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _by_step(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run appends to the same metrics.jsonl)."""
    return {record["step"]: record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("extra_validation") / "ep2"
    _run([*TORCHRUN, "-m", "launcher.train", *COMMON, *EXTRA, "trainer.max_steps=4", "checkpoint.interval=2",
          "checkpoint.keep_last=0", f"experiment.run_dir={run_dir}"])
    return run_dir


def test_validation_steps_log_the_extra_corpus_loss(reference):
    records = _by_step(reference)
    assert sorted(records) == [1, 2, 3, 4]
    for step in (2, 4):
        value = records[step]["val_loss/canterbury"]
        assert math.isfinite(value) and 2.0 < value < 8.0  # a byte model near its start: ln(256) = 5.5
        assert value != records[step]["val_loss"]
    assert "val_loss/canterbury" not in records[1] and "val_loss/canterbury" not in records[3]
    # The same fixed batches each time: the loss falls as the model learns.
    assert records[4]["val_loss/canterbury"] < records[2]["val_loss/canterbury"]


def test_extra_validation_does_not_change_training(reference, tmp_path):
    plain = tmp_path / "plain"
    _run([*TORCHRUN, "-m", "launcher.train", *COMMON, "trainer.max_steps=3", "checkpoint.save_at_end=false",
          f"experiment.run_dir={plain}"])
    with_extra, without = _by_step(reference), _by_step(plain)
    assert [with_extra[s]["loss"] for s in (1, 2, 3)] == [without[s]["loss"] for s in (1, 2, 3)]
    assert with_extra[2]["val_loss"] == without[2]["val_loss"]
    assert "val_loss/canterbury" not in without[2]


def test_resumed_run_at_ep1_logs_the_same_extra_validation(reference, tmp_path):
    resumed = tmp_path / "resumed"
    log = _run([sys.executable, "-m", "launcher.train", *COMMON, *EXTRA, "trainer.max_steps=4",
                "parallel.expert_model_parallel_size=1", "checkpoint.save_at_end=false",
                f"checkpoint.resume={reference / 'checkpoints' / 'step_0000002'}", f"experiment.run_dir={resumed}"])
    assert "resumed from" in log, log[-3000:]
    records, expected = _by_step(resumed), _by_step(reference)
    assert sorted(records) == [3, 4]
    assert records[4]["val_loss/canterbury"] == pytest.approx(expected[4]["val_loss/canterbury"], abs=1e-5)
    assert records[4]["val_loss"] == pytest.approx(expected[4]["val_loss"], abs=1e-5)
