"""tools/bench_layer.py: one tiny run through main(), and the equality its ratios rest on.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bench_layer.py -q

Each test spawns one rank (the layers need megatron's parallel_state): tens of seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_layer  # noqa: E402

from tests.distributed import run_distributed  # noqa: E402

FIELDS = ("case", "num_tokens", "num_experts", "topk", "real_per_token", "layer_ms", "megatron_ms", "floor_ms",
          "layer_over_megatron", "layer_over_floor", "megatron_over_floor", "layer_cpu_ms", "megatron_cpu_ms",
          "floor_cpu_ms", "cpu_layer_over_megatron", "cpu_layer_over_floor", "cpu_megatron_over_floor")


@pytest.mark.slow
def test_tiny_run_writes_every_row_with_its_fields(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_layer.main(["--json", str(out), "--experts", "4", "--tokens", "64", "--topk", "1", "2", "--hidden", "16",
                      "--ffn", "16", "--repeats", "1"])
    rows = json.loads(out.read_text())
    assert [(r["case"], r["topk"]) for r in rows] == [
        ("megatron", 1), ("floor", 1), ("anyexperts_fixed_k", 1), ("topk", 1),
        ("megatron", 2), ("floor", 2), ("anyexperts_fixed_k", 2), ("topk", 2), ("anyexperts_variable", 2)]
    for row in rows:
        for key in FIELDS:
            assert row[key] is not None, (row["case"], key)
        assert row["floor_ms"] > 0 and row["floor_cpu_ms"] > 0 and row["layer_ms"] > 0
        assert row["num_tokens"] == 64 and row["num_experts"] == 4
    for row in rows[:8]:
        assert row["real_per_token"] == row["topk"]
    for row in (r for r in rows if r["case"] == "anyexperts_fixed_k"):
        assert row["output_rel_diff"] <= bench_layer.TOLERANCE["fp32"]
    # The project's layers name the GroupedExperts path they ran (auto's rule: few rows per expert).
    assert {r["expert_path"] for r in rows if r["case"] not in ("megatron", "floor")} == {"grouped_mm"}
    (variable,) = (r for r in rows if r["case"] == "anyexperts_variable")
    # r = max(1, 0.5 * 2) = 1: every token keeps one of its two slots.
    assert variable["real_per_token"] == variable["target_real_per_token"] == 1.0
    assert variable["expected_ratio"] == 0.5 and variable["time_ratio"] > 0 and variable["cpu_time_ratio"] > 0
    assert variable["floor_ratio"] > 0 and isinstance(variable["within_5pct_of_floor_ratio"], bool)
    assert variable["within_5pct_of_floor_ratio"] == (abs(variable["time_ratio"] / variable["floor_ratio"] - 1) <= 0.05)
    for row in rows:
        if row["case"] in ("anyexperts_fixed_k", "topk"):
            assert row["layer_over_floor_for_target"] == pytest.approx(0.95 * row["megatron_over_floor"], abs=1e-4)
        else:
            assert "layer_over_floor_for_target" not in row
    assert "layer_over_floor" in capsys.readouterr().out


def _equality(rank, world_size):
    results = {}
    for topk in (1, 2):
        layers = bench_layer.Layers(num_experts=4, topk=topk, hidden=16, ffn=16, dtype="fp32", real_fractions=[0.75],
                                    seed=topk)
        hidden_SBH, _ = bench_layer.inputs(64, 16, torch.float32, seed=3)
        with torch.no_grad():
            ours, reference = layers.fixed(hidden_SBH)[0], layers.megatron(hidden_SBH)[0]
        result = dict(ours=ours, reference=reference,
                      counts=[bench_layer.routed_counts(layer, hidden_SBH) for layer in layers.timed.values()])
        with torch.no_grad():
            layers.fixed.experts.fc2_weight.mul_(1.001)
        try:
            bench_layer.check_same_output(layers, hidden_SBH, bench_layer.TOLERANCE["fp32"])
            result["raised"] = ""
        except AssertionError as error:
            result["raised"] = str(error)
        results[topk] = result
    return results


@pytest.mark.slow
def test_fixed_k_layer_computes_megatrons_moe_layer_and_the_check_catches_a_difference():
    results = run_distributed(_equality, 1, expert_parallel_size=1)[0]
    for topk, result in results.items():
        reference = result["reference"]
        torch.testing.assert_close(result["ours"], reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
        assert "anyexperts_fixed_k output differs from megatron" in result["raised"], topk
        # megatron, topk and anyexperts_fixed_k route alike; 64 tokens x k slots in all.
        (counts, real), *others = result["counts"][:3]
        assert sum(counts) == 64 * topk and real == topk and all(o == (counts, real) for o in others)
    # k = 2, f = 0.75: r = 1.5, the positional dither gives about half the tokens 2 slots.
    var_counts, var_real = results[2]["counts"][3]
    assert abs(var_real - 1.5) <= 2 / 64 and sum(var_counts) == round(var_real * 64)
