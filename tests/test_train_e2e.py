"""Real training runs through the entry point: torchrun with 2 processes, and one process.

The EP=2 run (2 processes, data-parallel 2) and the EP=1 run (1 process, 2 micro-batches)
see the same global batches and, thanks to layout-invariant initialisation, the same
weights: their losses must agree for the first steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# A smaller model and short run keep this to about a minute on 2 cores.
COMMON = ["experiment=shakespeare_cpu", "model.num_layers=2", "model.hidden_size=64",
          "model.num_attention_heads=4", "moe.expert_ffn_hidden_size=64", "model.seq_length=64",
          "trainer.eval_interval=4", "trainer.eval_iters=1", "logging.log_interval=1",
          "logging.tensorboard=false", "optim.warmup_steps=2", "checkpoint.save_at_end=false"]
ANYEXPERTS = ["moe=anyexperts", "moe.anyexperts.k_min=1", "moe.anyexperts.k_max=3",
              "moe.anyexperts.budget_target=1.5", "trainer.routing_trace_interval=4"]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
               "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _env() -> dict:
    # PYTHONPATH: tools/ scripts head sys.path with their own folder; the checkout under test
    # must still come before any other installed copy of the package.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    # pytest itself may run under a launcher (or a test may have set these): each run here
    # must discover its own world.
    for name in LAUNCH_VARS:
        env.pop(name, None)
    return env


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _ep2_and_ep1_runs(root: Path, extra: list[str], *, steps_ep2: int, steps_ep1: int) -> tuple[Path, Path]:
    """A 2-process torchrun run at EP=2 and a 1-process run at EP=1 of the same config."""
    ep2, ep1 = root / "ep2", root / "ep1"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "launcher.train", *COMMON, *extra, f"trainer.max_steps={steps_ep2}", f"experiment.run_dir={ep2}"])
    _run([sys.executable, "-m", "launcher.train", *COMMON, *extra, f"trainer.max_steps={steps_ep1}",
          "parallel.expert_model_parallel_size=1", f"experiment.run_dir={ep1}"])
    return ep1, ep2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The main job runs AnyExperts; these runs keep megatron's own MoELayer covered.
    return _ep2_and_ep1_runs(tmp_path_factory.mktemp("runs"), ["moe=topk"], steps_ep2=8, steps_ep1=3)


@pytest.fixture(scope="module")
def grouped_topk_runs(tmp_path_factory):
    # The project's top-k path: megatron's MoELayer with GroupedExperts.
    return _ep2_and_ep1_runs(tmp_path_factory.mktemp("grouped_topk_runs"), ["moe=topk", "moe.grouped_gemm=true"],
                             steps_ep2=4, steps_ep1=3)


@pytest.fixture(scope="module")
def anyexperts_runs(tmp_path_factory):
    return _ep2_and_ep1_runs(tmp_path_factory.mktemp("anyexperts_runs"), ANYEXPERTS, steps_ep2=8, steps_ep1=4)


def test_two_process_run_learns(runs):
    _, ep2 = runs
    losses = _losses(ep2)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses
    config = (ep2 / "config.yaml").read_text()
    assert "expert_model_parallel_size: 2" in config


def test_metrics_jsonl_has_the_promised_fields(runs):
    _, ep2 = runs
    records = [json.loads(line) for line in (ep2 / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    assert any("val_loss" in r for r in records)
    assert any(k.startswith("moe/load_balancing_loss/layer") for k in records[0])
    assert any(k.startswith("moe/tokens_per_expert/layer") for k in records[0])


def test_expert_parallel_matches_single_process(runs):
    ep1, ep2 = runs
    losses_ep1 = _losses(ep1)
    losses_ep2 = _losses(ep2)[:3]
    assert len(losses_ep1) == 3
    for step, (a, b) in enumerate(zip(losses_ep1, losses_ep2), start=1):
        assert abs(a - b) <= 1e-5, f"step {step}: EP=1 {a} vs EP=2 {b}"


def test_grouped_topk_path_learns_and_matches_single_process(grouped_topk_runs):
    ep1, ep2 = grouped_topk_runs
    losses_ep2 = _losses(ep2)
    assert len(losses_ep2) == 4 and losses_ep2[-1] < losses_ep2[0], losses_ep2
    for step, (a, b) in enumerate(zip(_losses(ep1), losses_ep2[:3]), start=1):
        assert abs(a - b) <= 1e-5, f"step {step}: EP=1 {a} vs EP=2 {b}"


def test_only_one_run_directory(runs):
    _, ep2 = runs
    # Hydra must not have made per-rank output folders in the working directory.
    assert not (REPO / "outputs").exists()
    names = {p.name for p in ep2.iterdir()}
    assert {"config.yaml", "metrics.jsonl"} <= names
    assert ".hydra" not in names


def test_bad_config_fails_before_any_process_group(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "experiment=shakespeare_cpu",
                           f"experiment.run_dir={tmp_path / 'bad'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parallel.expert_model_parallel_size=2" in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs where CUDA is available")
def test_bf16_without_cuda_is_a_config_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "experiment=shakespeare_cpu",
                           "parallel.expert_model_parallel_size=1", "trainer.precision=bf16",
                           f"experiment.run_dir={tmp_path / 'bf16'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.precision=bf16 needs a CUDA device" in proc.stderr
    assert not (tmp_path / "bf16").exists()


def test_missing_prepared_data_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "text_document"
    proc = subprocess.run([sys.executable, "-m", "launcher.train", *COMMON, "data=prepared",
                           f"data.data_prefix={missing}", "parallel.expert_model_parallel_size=1",
                           "trainer.max_steps=1", f"experiment.run_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout


def test_anyexperts_run_learns_with_fewer_real_experts_than_k_max(anyexperts_runs):
    _, ep2 = anyexperts_runs
    records = [json.loads(line) for line in (ep2 / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 0.5, losses
    real = [v for k, v in records[-1].items() if k.startswith("moe/real_experts_per_token/layer")]
    assert len(real) == 2 and all(1.0 <= v < 3.0 for v in real), real
    assert any(k.startswith("moe/a2a_bytes/layer") and v > 0 for k, v in records[-1].items())
    assert any(k.startswith("moe/k_histogram/layer") for k in records[-1])


def test_anyexperts_run_logs_the_allocation_diagnostics(anyexperts_runs):
    _, ep2 = anyexperts_runs
    records = [json.loads(line) for line in (ep2 / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert "val_loss" in last and "val_loss_shuffled_allocation" in last
    assert abs(last["val_loss_shuffled_allocation"] - last["val_loss"]) < 1.0  # same batches, same model
    for layer in (1, 2):
        for name in ("k_std", "k_off_mode_frac", "k_position_corr",
                     "val_real_experts_per_token", "val_k_off_mode_frac", "importance_loss_spearman"):
            assert f"moe/{name}/layer{layer}" in last, name
        assert 0.0 <= last[f"moe/k_off_mode_frac/layer{layer}"] <= 1.0
        assert -1.0 <= last[f"moe/importance_loss_spearman/layer{layer}"] <= 1.0
        assert 1.0 <= last[f"moe/val_real_experts_per_token/layer{layer}"] <= 3.0
    # The default straight-through allocation computes in training what evaluation computes:
    # no separate evaluation count (fractional logs one; tests/test_allocation.py).
    assert "real_experts_per_token_at_eval" not in last
    assert "real_experts_per_token" in last


def test_anyexperts_expert_parallel_matches_single_process(anyexperts_runs):
    ep1, ep2 = anyexperts_runs
    for step, (a, b) in enumerate(zip(_losses(ep1), _losses(ep2)[:4]), start=1):
        assert abs(a - b) <= 1e-5, f"step {step}: EP=1 {a} vs EP=2 {b}"


def test_routing_trace_is_written_and_readable(anyexperts_runs):
    _, ep2 = anyexperts_runs
    traces = sorted((ep2 / "routing_traces").glob("step_*_rank*.npz"))
    assert [t.name for t in traces] == ["step_0000004_rank0.npz", "step_0000004_rank1.npz",
                                        "step_0000008_rank0.npz", "step_0000008_rank1.npz"]
    proc = _run([sys.executable, "tools/plot_routing.py", str(traces[-1])], timeout=120)
    first_table = proc.stdout.split("\n\n")[0]
    rows = [line.split() for line in first_table.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert 1.0 <= float(row[2]) <= 3.0  # mean K within [k_min, k_max]
