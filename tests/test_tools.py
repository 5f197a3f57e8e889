"""The thin command-line tools: compare_runs and plot_routing on synthetic inputs."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
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


def _classes_of(text: bytes) -> list[str]:
    classes = plot_routing.token_classes(torch.tensor(list(text)).reshape(-1, 1))
    assert classes.shape == (len(text), 1) and classes.dtype == torch.int64
    return [plot_routing.CLASS_NAMES[c] for c in classes[:, 0].tolist()]


def test_token_classes_of_one_sequence():
    assert _classes_of(b"ab c\nd,") == ["word_start", "word_inner", "space", "word_start", "newline",
                                        "word_start", "punctuation"]
    assert _classes_of(b"\tx\ryZ9a") == ["space", "word_start", "newline", "word_start", "word_inner",
                                         "other", "word_start"]
    # A 1-D tensor is one sequence.
    assert plot_routing.token_classes(torch.tensor(list(b"ab"))).tolist() == [plot_routing.WORD_START,
                                                                              plot_routing.WORD_INNER]
    # Every byte and end-of-document, each at position 0 of its own sequence ([1, 257]).
    classes = plot_routing.token_classes(torch.arange(257).reshape(1, -1))[0]
    expected = []
    for b in range(257):
        ch = chr(b)
        if b in (32, 9):
            expected.append("space")
        elif b in (10, 13):
            expected.append("newline")
        elif b < 128 and ch in string.punctuation:
            expected.append("punctuation")
        elif b < 128 and ch.isalpha():
            expected.append("word_start")
        else:
            expected.append("other")  # digits, other control bytes, non-ASCII bytes, eod 256
    assert [plot_routing.CLASS_NAMES[c] for c in classes.tolist()] == expected
    assert expected.count("punctuation") == 32 and expected.count("word_start") == 52


# Two sequences of 7 tokens (256 = end-of-document), stored [sequence, batch]: row s * 2 + b.
# Position 1 of each sequence has a letter in the row before it but not along its own sequence
# (and the other way round), so taking the previous row instead of s - 1 gives other classes.
_SEQ0 = list(b"ab c\nd,")
_SEQ1 = list(b"1xy.Z\r") + [256]
_CLASSES_SB = [  # [s][b]
    ["word_start", "other"],
    ["word_inner", "word_start"],
    ["space", "word_inner"],
    ["word_start", "punctuation"],
    ["newline", "word_start"],
    ["word_start", "newline"],
    ["punctuation", "other"],
]
# Per token in [s, b] order: E = 4 real experts (ids 4, 5 virtual), K_max = 3.
_ROUTING = [  # (expert_ids, virtual slots, dropped slots) -> real experts not dropped
    ([0, 1, -1], [], []),   # (0,0) a      real 2, K 2
    ([2, -1, -1], [], []),  # (0,1) 1      real 1, K 1
    ([3, 4, -1], [1], []),  # (1,0) b      real 1, K 2
    ([0, -1, -1], [], []),  # (1,1) x      real 1, K 1
    ([4, -1, -1], [0], []),  # (2,0) space real 0, K 1
    ([1, 2, 3], [], [2]),   # (2,1) y      real 2, K 3
    ([2, 3, -1], [], []),   # (3,0) c      real 2, K 2
    ([1, -1, -1], [], []),  # (3,1) .      real 1, K 1
    ([0, 5, -1], [1], []),  # (4,0) \n     real 1, K 2
    ([0, 1, 2], [], []),    # (4,1) Z      real 3, K 3
    ([3, -1, -1], [], []),  # (5,0) d      real 1, K 1
    ([2, 1, -1], [], [0]),  # (5,1) \r     real 1, K 2
    ([1, -1, -1], [], []),  # (6,0) ,      real 1, K 1
    ([4, 5, -1], [0, 1], []),  # (6,1) eod real 0, K 2
]


def _token_class_record() -> dict:
    virtual = torch.zeros(14, 3, dtype=torch.bool)
    dropped = torch.zeros(14, 3, dtype=torch.bool)
    for i, (_, v, d) in enumerate(_ROUTING):
        virtual[i, v] = True
        dropped[i, d] = True
    expert_ids = torch.tensor([ids for ids, _, _ in _ROUTING])
    return {
        "layer_number": 3, "num_experts": 4, "seq_length": 7,
        "tokens": torch.tensor(_SEQ0 + _SEQ1).reshape(2, 7).t().reshape(-1),  # [b, s] -> [s, b] order
        "k": (expert_ids >= 0).sum(1),
        "importance": torch.linspace(0, 1, 14),
        "expert_ids": expert_ids, "virtual_mask": virtual, "dropped_mask": dropped,
    }


def test_token_classes_take_the_previous_token_along_the_sequence():
    record = _token_class_record()
    assert record["tokens"][:4].tolist() == [ord("a"), ord("1"), ord("b"), ord("x")]
    classes = plot_routing.token_classes(record["tokens"].reshape(7, 2))
    assert [[plot_routing.CLASS_NAMES[c] for c in row] for row in classes.tolist()] == _CLASSES_SB


def test_plot_routing_summary_by_token_class():
    (row,) = plot_routing.summarise([_token_class_record()])
    assert abs(row["real_per_token"] - 17 / 14) < 1e-6  # the unchanged overall mean (float32)
    assert row["tokens_by_class"] == {"space": 1, "newline": 2, "punctuation": 2, "word_start": 5,
                                      "word_inner": 2, "other": 2}
    expected_real = {"space": 0.0, "newline": (1 + 1) / 2, "punctuation": (1 + 1) / 2,
                     "word_start": (2 + 1 + 2 + 3 + 1) / 5, "word_inner": (1 + 2) / 2, "other": (1 + 0) / 2}
    expected_k = {"space": 1.0, "newline": (2 + 2) / 2, "punctuation": (1 + 1) / 2,
                  "word_start": (2 + 1 + 2 + 3 + 1) / 5, "word_inner": (2 + 3) / 2, "other": (1 + 2) / 2}
    assert row["real_by_token_class"].keys() == expected_real.keys()
    assert row["k_by_token_class"].keys() == expected_k.keys()
    for name in expected_real:
        assert abs(row["real_by_token_class"][name] - expected_real[name]) < 1e-12, name
        assert abs(row["k_by_token_class"][name] - expected_k[name]) < 1e-12, name
    # Virtual slots per token by class, from the table above (rows in [s, b] order).
    virtual_by_class: dict[str, list[int]] = {}
    for i, (_, virtual, _) in enumerate(_ROUTING):
        virtual_by_class.setdefault(_CLASSES_SB[i // 2][i % 2], []).append(len(virtual))
    assert row["virtual_by_token_class"] == {name: sum(v) / len(v) for name, v in virtual_by_class.items()}
    assert len(set(row["virtual_by_token_class"].values())) > 1


def test_plot_routing_summary_leaves_out_classes_without_tokens():
    record = _token_class_record()
    keep = torch.arange(14) % 2 == 0  # only the first sequence, b"ab c\nd,": no "other" token
    one = {key: (value[keep] if torch.is_tensor(value) else value) for key, value in record.items()}
    (row,) = plot_routing.summarise([one])
    assert row["tokens_by_class"] == {"space": 1, "newline": 1, "punctuation": 1, "word_start": 3, "word_inner": 1}
    assert "other" not in row["real_by_token_class"] and "other" not in row["k_by_token_class"]
    assert abs(row["real_by_token_class"]["word_start"] - (2 + 2 + 1) / 3) < 1e-12
    assert row["real_by_token_class"]["space"] == 0.0


def test_plot_routing_prints_the_token_class_table_only_with_tokens(tmp_path, capsys):
    from anyexperts.moe.trace import save_trace

    with_tokens = _token_class_record()
    without = {key: value for key, value in with_tokens.items() if key != "tokens"}
    (row,) = plot_routing.summarise([without])
    assert "real_by_token_class" not in row and "tokens_by_class" not in row and "k_by_token_class" not in row

    (row_with_tokens,) = plot_routing.summarise([with_tokens])
    path = save_trace([with_tokens, dict(with_tokens, layer_number=4)], tmp_path / "trace.npz")
    assert plot_routing.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("real experts per token by token class (byte tokenizer)")
    assert lines[start + 1].split() == ["layer", *plot_routing.CLASS_NAMES]
    assert lines[start + 2].split() == ["3", "0.000", "1.000", "1.000", "1.800", "1.500", "0.500"]
    assert lines[start + 3].split()[0] == "4"
    assert lines[start + 4] == ""
    assert lines[start + 5] == "virtual experts per token by token class (byte tokenizer)"
    virtual = row_with_tokens["virtual_by_token_class"]
    assert lines[start + 7].split() == ["3", *(f"{virtual[name]:.3f}" for name in plot_routing.CLASS_NAMES)]
    assert lines[start + 9].split() == ["tokens", "1", "2", "2", "5", "2", "2"]
    assert len(lines) == start + 10

    path = save_trace([without], tmp_path / "plain.npz")
    assert plot_routing.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "token class" not in out and len(out.splitlines()) == 2  # header and the one layer


def test_bench_checkpoint_hashes_a_synthetic_checkpoint_and_prints_its_row(tmp_path, capsys):
    import bench_checkpoint

    assert bench_checkpoint.main(["--synthetic-mib", "8", "--work-dir", str(tmp_path),
                                  "--json", str(tmp_path / "bench.json")]) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["hashing"]
    assert row["mib"] == 8.0 and row["files"] == 8 and row["ranks"] == 2
    assert row["save_checksum_s"] > 0 and row["load_verify_s"] > 0 and row["one_rank_mib_per_s"] > 0
    assert "synthetic 8 MiB" in capsys.readouterr().out
    assert not (tmp_path / "synthetic").exists()


def test_bench_throughput_reads_the_windows_after_warm_up_and_the_final_checkpoint(tmp_path):
    import bench_throughput

    records = [{"step": 1000, "tokens_per_s": 5.0},  # the grid run's own last window
               {"step": 1005, "tokens_per_s": 10.0, "moe/real_experts_per_token/layer1": 9.0},  # warm-up
               {"step": 1010, "tokens_per_s": 100.0, "moe/real_experts_per_token/layer1": 1.5,
                "moe/real_experts_per_token/layer2": 2.5},
               {"step": 1015, "tokens_per_s": 200.0, "moe/real_experts_per_token/layer1": 2.0,
                "moe/real_experts_per_token/layer2": 2.0}]
    summary = bench_throughput.summarise_windows(records, start=1000, method="m")
    assert summary == {"tokens_per_s": 150.0, "real_experts_per_token": 2.0}
    with pytest.raises(SystemExit, match="no timed window"):
        bench_throughput.summarise_windows(records[:2], start=1000, method="m")
    run_dir = tmp_path / "top2_s1"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="has no checkpoint"):
        bench_throughput.final_checkpoint(run_dir)
    for name in ("step_0000500", "step_0001000", "step_0001100.bad"):
        (run_dir / "checkpoints" / name).mkdir()
    assert bench_throughput.final_checkpoint(run_dir).name == "step_0001000"


def test_bench_throughput_main_job_needs_no_grid_and_refuses_both(monkeypatch):
    import bench_throughput

    assert list(bench_throughput.MAIN_JOB_METHODS) == ["topk", "topk_grouped", "anyexperts"]
    assert bench_throughput.MAIN_JOB_METHODS["topk_grouped"] == ["moe=topk", "moe.grouped_gemm=true"]
    for argv in ([], ["--main-job", "--grid-dir", "x"]):
        monkeypatch.setattr(sys, "argv", ["bench_throughput.py", *argv])
        with pytest.raises(SystemExit, match="either --grid-dir"):
            bench_throughput.main()
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--main-job", "--methods", "anyexperts"])
    with pytest.raises(SystemExit, match="must include topk"):
        bench_throughput.main()


def test_bench_expert_paths_times_every_path_and_reports_the_rule(tmp_path, capsys):
    import bench_expert_paths

    out = tmp_path / "paths.json"
    rows = bench_expert_paths.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["num_experts"], r["rows_per_expert"]) for r in rows] == [(4, 8), (4, 64)]
    for row in rows:
        times = {p: row[f"{p}_ms"] for p in bench_expert_paths.PATHS}
        assert all(t > 0 for t in times.values()) and row["best"] == min(times, key=times.get)
        assert row["rule_over_best"] >= 1.0
        assert row["rule_over_best"] == pytest.approx(times[row["auto"]] / times[row["best"]], rel=1e-2)
    # auto's rule: grouped_mm below 64 rows per expert, blocked from there.
    assert [r["auto"] for r in rows] == ["grouped_mm", "blocked"]
    assert "rule_over_best" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the paths are grouped_mm and loop in every dtype")
def test_bench_expert_paths_leaves_out_what_cannot_run(tmp_path):
    import bench_expert_paths

    rows = bench_expert_paths.main(["--quick", "--dtype", "bf16"])
    for row in rows:
        # blocked runs fp32/fp64 only: no time, no ratio, and auto does not pick it.
        assert row["blocked_ms"] is None and row["blocked_over_grouped_mm"] is None
        assert row["grouped_mm_ms"] > 0 and row["loop_ms"] > 0
        assert row["auto"] == "grouped_mm" and row["dtype"] == "bf16" and row["device"] == "cpu"


def test_eval_uniform_k_covers_each_methods_slot_range():
    import eval_uniform_k

    assert eval_uniform_k.slot_range("straight_through_b1.8") == (1, 3)
    assert eval_uniform_k.slot_range("straight_through_b2.0") == (1, 4)


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """The prepared GPU script, run as its CPU dry run: every step passes, and OUT holds the
    files the device tool brings back (at most 8)."""
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable, "RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "layer.json", "paths.json", "train_ae.metrics.jsonl",
                     "train_topk.metrics.jsonl"], files
    log = (out / "gpu_check.log").read_text()
    assert "failed steps: 0" in log
    for name in ("gpu_tests", "paths", "layer", "train_ae", "train_topk"):
        assert f"{name}: exit 0" in log
    assert {row["dtype"] for row in json.loads((out / "paths.json").read_text())} == {"bf16"}
    assert json.loads((out / "layer.json").read_text())[0]["device"] == "cpu"
    losses = [json.loads(line)["loss"] for line in (out / "train_ae.metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses


def test_gpu_check_script_without_packages_names_the_fix(tmp_path):
    # A bare python (no megatron-core) and a copy of the script alone (no .whl beside it): the
    # script says which command fetches the wheels.
    import shutil

    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    (tmp_path / "repo" / "tools").mkdir(parents=True)
    script = shutil.copy(REPO / "tools" / "gpu_check.sh", tmp_path / "repo" / "tools" / "gpu_check.sh")
    proc = subprocess.run(["bash", str(script), "run", str(tmp_path / "out")], env={**os.environ, "PYTHON": str(bare)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gpu_check.sh wheels" in proc.stderr, proc.stderr
