"""The thin command-line tools: compare_runs and plot_routing on synthetic inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import compare_runs  # noqa: E402
import plot_routing  # noqa: E402


def _write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_compare_runs_summarises_losses_and_experts(tmp_path):
    run = _write_run(tmp_path / "a", [
        {"step": 1, "loss": 5.0, "tokens_per_s": 100.0},
        {"step": 2, "loss": 4.0, "tokens_per_s": 300.0, "val_loss": 4.5,
         "moe/real_experts_per_token/layer1": 1.5, "moe/real_experts_per_token/layer2": 2.5,
         "moe/virtual_experts_per_token/layer1": 0.5, "moe/virtual_experts_per_token/layer2": 0.0},
    ])
    row = compare_runs.summarise(run)
    assert row["first_loss"] == 5.0 and row["last_loss"] == 4.0 and row["last_val_loss"] == 4.5
    assert row["real_experts_per_token"] == 2.0 and row["virtual_experts_per_token"] == 0.25
    assert row["real_per_layer"] == [1.5, 2.5]
    assert row["tokens_per_s"] == 200.0


def test_compare_runs_names_a_missing_metrics_file(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr


def test_plot_routing_summary_counts_real_virtual_and_dropped():
    # 2 positions x 2 sequences; E = 4 real experts, ids 4.. are virtual.
    record = {
        "layer_number": 1, "num_experts": 4, "seq_length": 2,
        "k": torch.tensor([1, 2, 3, 2]),
        "importance": torch.tensor([0.0, 0.5, 1.0, 0.5]),
        "expert_ids": torch.tensor([[0, -1, -1], [1, 4, -1], [2, 3, 5], [3, 0, -1]]),
        "virtual_mask": torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]).bool(),
        "dropped_mask": torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]).bool(),
    }
    (row,) = plot_routing.summarise([record])
    assert row["mean_k"] == 2.0
    assert row["real_per_token"] == (1 + 1 + 1 + 2) / 4  # the dropped slot does not count
    assert row["virtual_per_token"] == 0.5
    assert row["dropped_per_token"] == 0.25
    assert row["k_histogram"] == [0, 1, 2, 1]
    # Positions are 0,0,1,1 in [sequence, batch] order: Pearson r of (0,.5,1,.5) with them is 1/sqrt(2).
    assert abs(row["corr_importance_position"] - 2 ** -0.5) < 1e-9
