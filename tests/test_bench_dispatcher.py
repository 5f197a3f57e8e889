"""tools/bench_dispatcher.py: one tiny run through main() at EP=1 and EP=2, every row with its fields.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bench_dispatcher.py -q

Each test spawns its ranks (the layers need megatron's parallel_state): tens of seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_dispatcher  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_run_writes_every_case_with_bytes_and_floor(tmp_path, capsys, world_size):
    out = tmp_path / "rows.json"
    bench_dispatcher.main(["--json", str(out), "--world-size", str(world_size), "--tokens", "64", "--experts", "4",
                           "--topk", "2", "--mean-real", "1.5", "--kmax", "2", "4", "--hidden", "16", "--ffn", "16",
                           "--repeats", "1", "--sweep-tokens", "32", "--sweep-experts", "4"])
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["fixed_topk", "variable", "kmax_memory", "kmax_memory", "sweep"]
    for row in rows:
        assert row["ep_size"] == world_size and row["ours_ms"] > 0 and row["peak_mem_bytes"] > 0
        # Only real slots travel, and nothing travels within one rank.
        assert row["bytes_sent"] == row["bytes_expected"]
        assert (row["bytes_sent"] > 0) == (world_size > 1)
    for row in (r for r in rows if r["case"] in ("fixed_topk", "sweep")):
        assert row["floor_ms"] > 0 and row["megatron_ms"] > 0
        assert row["ours_over_floor"] == pytest.approx(row["ours_ms"] / row["floor_ms"], rel=2e-3)
        assert row["ours_over_floor_for_target"] == pytest.approx(0.95 * row["megatron_over_floor"], abs=1e-4)
    for row in (r for r in rows if r["case"] not in ("fixed_topk", "sweep")):
        assert "floor_ms" not in row
    (variable,) = (r for r in rows if r["case"] == "variable")
    assert 0 < variable["real_fraction"] < 1 and variable["time_vs_fixed"] > 0
    assert "ours_over_floor" in capsys.readouterr().out


def _fresh_pages(num_pages: int):
    """An anonymous mapping of num_pages 4 KiB pages, each touched once: num_pages minor faults
    (huge pages off, so that the kernel does not map 2 MiB at a time)."""
    import mmap

    pages = mmap.mmap(-1, num_pages * 4096)
    pages.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, num_pages * 4096, 4096):
        pages[offset] = 1
    return pages


def _warm_up_rounds(rank, world_size):
    from bench_dispatcher import warm_up

    kept = []

    def growing():  # fresh memory in its first two calls only, as a heap that reaches its mark
        if len(kept) < 2:
            kept.append(_fresh_pages(2048))

    calm = {"a": lambda: None, "b": lambda: None}
    return (warm_up({"grows": growing, **calm}, None), warm_up(calm, None),
            warm_up({"grows": lambda: kept.append(_fresh_pages(2048))}, None, max_rounds=3))


def test_warm_up_runs_until_the_heap_stops_growing():
    until_calm, calm, never_calm = run_distributed(_warm_up_rounds, 1)[0]
    assert (until_calm, calm, never_calm) == (3, 1, 3)
