"""tools/bench_balancer.py: its routing, and one tiny run printing and writing its rows.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bench_balancer.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_balancer  # noqa: E402


def test_zipf_routing_draws_distinct_experts_by_popularity():
    expert_TK, gate_TK = bench_balancer.zipf_routing(4000, 8, 2, 1.5, seed=0, shuffled=False)
    assert expert_TK.shape == gate_TK.shape == (4000, 2)
    assert torch.all(expert_TK[:, 0] != expert_TK[:, 1])
    torch.testing.assert_close(gate_TK.sum(1), torch.ones(4000))
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=8)
    assert torch.all(counts_E[:-1] >= counts_E[1:] * 0.9) and counts_E[0] > 3 * counts_E[-1]
    uniform_TK, _ = bench_balancer.zipf_routing(4000, 8, 2, 0.0, seed=0, shuffled=False)
    uniform_E = torch.bincount(uniform_TK.reshape(-1), minlength=8).double()
    assert float(uniform_E.max() / uniform_E.mean()) < 1.1


@pytest.mark.slow
def test_tiny_run_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_balancer.main(["--ep-sizes", "2", "--tokens", "64", "--experts", "8", "--hidden", "16", "--ffn", "16",
                         "--repeats", "1", "--min-chunk", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["zipf_s1", "zipf_s1.5", "balanced"]
    for row in rows:
        for key in ("case", "ep_size", "zipf_s", "rank_load_imbalance_before", "rank_load_imbalance_after",
                    "layer_ms_plain", "layer_ms_rebalanced", "weight_bytes_moved"):
            assert key in row, key
        assert row["rank_load_imbalance_after"] <= row["rank_load_imbalance_before"]
    assert rows[1]["active"] and rows[1]["weight_bytes_moved"] > 0 and rows[1]["rank_load_imbalance_after"] <= 1.1
    assert not rows[2]["active"] and rows[2]["weight_bytes_moved"] == 0
    assert "rank_load_imbalance_before" in capsys.readouterr().out
