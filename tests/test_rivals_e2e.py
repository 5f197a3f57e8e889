"""Short training runs of the rival routers through the entry point (one process each):
top-p and ReMoE train, log the AnyExperts layer's statistics and their own, and top-p's
threshold p survives a checkpoint and resume.

    OMP_NUM_THREADS=1 python -m pytest tests/test_rivals_e2e.py -q
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import COMMON, _run

pytestmark = pytest.mark.slow

ONE_PROCESS = [*COMMON, "parallel.expert_model_parallel_size=1"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir: Path, *overrides: str) -> list[dict]:
    _run([sys.executable, "-m", "launcher.train", *ONE_PROCESS, *overrides, f"experiment.run_dir={run_dir}"])
    return _records(run_dir)


@pytest.fixture(scope="module")
def topp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("topp")
    first = _train(run_dir, "moe=topp", "trainer.max_steps=3", "checkpoint.save_at_end=true")
    # metrics.jsonl is appended to: the resumed run's records follow the first run's.
    resumed = _train(run_dir, "moe=topp", "trainer.max_steps=5", "checkpoint.save_at_end=false")[len(first):]
    return first, resumed


@pytest.fixture(scope="module")
def remoe_run(tmp_path_factory):
    # A larger starting coefficient than the paper's 1e-8: a few steps must show it at work.
    return _train(tmp_path_factory.mktemp("remoe"), "moe=remoe", "moe.remoe.l1_coeff=1e-3", "trainer.max_steps=4")


def _check_layer_statistics(record: dict, own: tuple[str, ...]) -> None:
    for layer in (1, 2):
        for name in ("real_experts_per_token", "k_histogram", "tokens_per_expert", "load_imbalance", *own):
            assert f"moe/{name}/layer{layer}" in record, name
        assert f"moe/importance_mean/layer{layer}" not in record  # the rivals have no importance


def test_topp_run_trains_and_logs(topp_run):
    first, _ = topp_run
    assert len(first) == 3 and all(math.isfinite(r["loss"]) for r in first)
    _check_layer_statistics(first[-1], ("top_p", "entropy_loss", "load_balance_loss"))
    assert "val_loss" in first[-1]


def test_topp_threshold_moves_and_survives_resume(topp_run):
    first, resumed = topp_run
    top_p = [r["moe/top_p/layer1"] for r in first] + [r["moe/top_p/layer1"] for r in resumed]
    assert [r["step"] for r in resumed] == [4, 5]
    # At initialisation the router is near uniform: p = 0.4 selects about 3 experts, over
    # the target 2.0, so p falls every step, across the resume too (a reset p would be 0.4).
    assert first[0]["real_experts_per_token"] > 2.0
    assert all(later < earlier for earlier, later in zip(top_p, top_p[1:])), top_p


def test_remoe_run_trains_and_raises_its_coefficient(remoe_run):
    assert len(remoe_run) == 4 and all(math.isfinite(r["loss"]) for r in remoe_run)
    _check_layer_statistics(remoe_run[-1], ("l1_coeff", "l1_loss"))
    coeffs = [r["moe/l1_coeff/layer1"] for r in remoe_run]
    # ReLU gates start with about half the experts active (4 of 8 > 2.0): lambda grows by 1.2 a step.
    assert remoe_run[0]["real_experts_per_token"] > 2.0
    assert coeffs[1] == pytest.approx(coeffs[0] * 1.2, rel=1e-3)
