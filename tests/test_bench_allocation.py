"""tools/bench_allocation.py on synthetic run directories: extraction, aggregation, the
allocation checks, resume and dry-run (nothing trains: the launcher is monkeypatched)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_allocation as bench  # noqa: E402

STEPS = 20


def _layers(name: str, values: list[float]) -> dict:
    return {f"moe/{name}/layer{i}": v for i, v in enumerate(values, 1)}


def _final_record(val_loss: float, *, shuffled: float | None = None, real=(1.8, 1.8), val_real=None,
                  off_mode=None, corr=None, step: int = STEPS) -> dict:
    record = {"step": step, "loss": val_loss + 0.1, "tokens_per_s": 300.0, "val_loss": val_loss,
              **_layers("real_experts_per_token", list(real))}
    if shuffled is not None:
        record["val_loss_shuffled_allocation"] = shuffled
    for name, values in (("val_real_experts_per_token", val_real), ("k_off_mode_frac", off_mode),
                         ("k_position_corr", corr)):
        if values is not None:
            record.update(_layers(name, list(values)))
    return record


def _write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def _ok_run(method: str, seed: int, val_loss: float, **fields) -> dict:
    run = {"method": method, "seed": seed, "status": "ok", "val_loss": val_loss,
           "val_loss_shuffled_allocation": None, "tokens_per_s": 100.0}
    run.update({name: None for name in bench.PER_LAYER_STATS})
    run.update(fields)
    return run


def test_methods_have_their_budgets_and_overrides():
    assert bench.method_budget("top1") == 1.0 and bench.method_budget("top2") == 2.0
    assert bench.method_budget("dither_b1.8") == 1.8 and bench.method_budget("fractional_b2.0") == 2.0
    assert "moe.anyexperts.k_rounding=straight_through" in bench.METHODS["straight_through_b2.0"]
    assert "moe.anyexperts.k_max=4" in bench.METHODS["dither_b2.0"]
    assert "moe.anyexperts.k_max=3" in bench.METHODS["fractional_b1.8"]
    assert bench.is_anyexperts("dither_b1.8") and not bench.is_anyexperts("top2")


@pytest.mark.parametrize("method", sorted(bench.METHODS))
def test_every_method_composes_into_a_valid_config(method):
    from anyexperts.config import to_dataclass, validate
    from tests.test_config import compose_cfg

    cfg = to_dataclass(compose_cfg("experiment=shakespeare_cpu", "parallel.expert_model_parallel_size=1",
                                   *bench.METHODS[method]))
    validate(cfg, world_size=1)
    if bench.is_anyexperts(method):
        assert cfg.moe.anyexperts.budget_target == bench.method_budget(method)


def test_rival_methods_target_the_same_compute():
    assert bench.method_budget("topp_b2.0") == 2.0 and bench.method_budget("remoe_b2.0") == 2.0
    assert bench.METHODS["topp_b2.0"] == ["moe=topp", "moe.topp.target_real_experts=2.0"]
    assert bench.METHODS["remoe_b2.0"] == ["moe=remoe", "moe.remoe.target_real_experts=2.0"]
    assert bench.allocates_per_token("remoe_b2.0") and bench.allocates_per_token("dither_b1.8")
    assert not bench.allocates_per_token("top2") and not bench.is_anyexperts("topp_b2.0")


def test_extract_run_reads_the_final_validation_and_last_training_stats(tmp_path):
    run = _write_run(tmp_path / "dither_b1.8_s1", [
        {"step": 10, "loss": 3.0, "tokens_per_s": 100.0, "val_loss": 3.1, "val_loss_shuffled_allocation": 3.3,
         **_layers("real_experts_per_token", [1.0, 1.0]), **_layers("k_std", [0.9, 0.8])},
        {"step": 15, "loss": 2.8, "tokens_per_s": 200.0, **_layers("real_experts_per_token", [1.7, 1.9])},
        {"step": STEPS, "loss": 2.5, "tokens_per_s": 400.0, "val_loss": 2.6, "val_loss_shuffled_allocation": 2.9,
         **_layers("val_real_experts_per_token", [1.79, 1.81]), **_layers("k_off_mode_frac", [0.3, 0.4]),
         **_layers("k_position_corr", [0.05, -0.1])},
    ])
    row = bench.extract_run(run, STEPS)
    assert row["val_loss"] == 2.6 and row["val_loss_shuffled_allocation"] == 2.9
    assert row["real_experts_per_token"] == [1.7, 1.9]  # the last record that has it, not the first
    assert row["val_real_experts_per_token"] == [1.79, 1.81]
    assert row["k_off_mode_frac"] == [0.3, 0.4] and row["k_position_corr"] == [0.05, -0.1]
    assert row["k_std"] == [0.9, 0.8]
    assert row["importance_loss_spearman"] is None and row["virtual_experts_per_token"] is None
    assert row["tokens_per_s"] == 200.0


def test_extract_run_of_a_topk_run_leaves_the_shuffled_loss_out(tmp_path):
    run = _write_run(tmp_path / "top2_s1", [_final_record(2.0, real=(2.0, 2.0))])
    row = bench.extract_run(run, STEPS)
    assert row["val_loss_shuffled_allocation"] is None and row["real_experts_per_token"] == [2.0, 2.0]


def test_finished_and_unfinished_runs(tmp_path):
    finished = _write_run(tmp_path / "a", [{"step": 10, "loss": 3.0}, _final_record(2.0)])
    no_final_val = _write_run(tmp_path / "b", [{"step": 10, "loss": 3.0, "val_loss": 3.1}, {"step": STEPS, "loss": 2.0}])
    stopped_early = _write_run(tmp_path / "c", [_final_record(2.0, step=STEPS - 10)])
    (stopped_early / "metrics.jsonl").open("a").write('{"step": 20, "lo')  # killed mid-write
    assert bench.is_finished(finished, STEPS)
    assert not bench.is_finished(no_final_val, STEPS)
    assert not bench.is_finished(stopped_early, STEPS)
    assert not bench.is_finished(tmp_path / "missing", STEPS)
    with pytest.raises(ValueError, match="no validation record"):
        bench.extract_run(no_final_val, STEPS)


def test_aggregate_means_spreads_and_paired_differences():
    runs = [
        _ok_run("top2", 1, 2.0), _ok_run("top2", 2, 2.2), _ok_run("top2", 3, 2.4),
        _ok_run("dither_b1.8", 1, 1.9, val_loss_shuffled_allocation=2.2, real_experts_per_token=[1.7, 1.9]),
        _ok_run("dither_b1.8", 2, 2.08, val_loss_shuffled_allocation=2.38, real_experts_per_token=[1.8, 1.8]),
        _ok_run("dither_b1.8", 3, 2.32, val_loss_shuffled_allocation=2.52, real_experts_per_token=[1.6, 2.0]),
    ]
    top2, dither = bench.aggregate(runs, ["top2", "dither_b1.8"])
    assert top2["val_loss"]["mean"] == pytest.approx(2.2)
    assert top2["val_loss"]["std"] == pytest.approx(0.2)  # sample std of 2.0, 2.2, 2.4
    assert top2["vs_top2"]["reading"] is None and top2["a_budget_ok"] is None
    assert dither["val_loss"]["mean"] == pytest.approx((1.9 + 2.08 + 2.32) / 3)
    assert (dither["val_loss"]["min"], dither["val_loss"]["max"]) == (1.9, 2.32)
    # Paired diffs -0.1, -0.12, -0.08: mean -0.1 > std 0.02 in size, so better.
    diffs = dither["vs_top2"]["diffs_by_seed"]
    assert diffs == pytest.approx({1: -0.1, 2: -0.12, 3: -0.08})
    assert dither["vs_top2"]["mean"] == pytest.approx(-0.1)
    assert dither["vs_top2"]["std"] == pytest.approx(0.02)
    assert dither["vs_top2"]["reading"] == "better"
    assert dither["shuffle_gap"]["mean"] == pytest.approx((0.3 + 0.3 + 0.2) / 3)
    assert dither["shuffle_gap"]["std"] == pytest.approx(statistics.stdev([0.3, 0.3, 0.2]))
    assert dither["real_experts_per_token_train"] == pytest.approx(1.8)
    assert dither["budget"] == 1.8 and dither["seeds"] == [1, 2, 3]


def test_paired_reading_says_no_difference_below_the_spread_and_one_seed():
    assert bench.paired_reading([-0.1, -0.1, 0.1]) == "no difference"  # |mean| 0.033 < std 0.115
    assert bench.paired_reading([0.1, 0.12, 0.08]) == "worse"
    assert bench.paired_reading([-0.5]) == "one seed"
    assert bench.paired_reading([]) is None


def test_paired_differences_only_on_seeds_top2_ran():
    runs = [_ok_run("top2", 1, 2.0), _ok_run("top1", 1, 2.3), _ok_run("top1", 2, 2.5)]
    _, top1 = bench.aggregate(runs, ["top2", "top1"])
    assert top1["vs_top2"]["diffs_by_seed"] == pytest.approx({1: 0.3})
    assert top1["vs_top2"]["reading"] == "one seed"
    assert top1["val_loss"]["std"] == pytest.approx(statistics.stdev([2.3, 2.5]))


def test_check_a_budget_uses_the_training_window_and_the_worst_layer():
    inside = [_ok_run("dither_b1.8", 1, 2.0, real_experts_per_token_window=[1.79, 1.83],
                      val_real_experts_per_token=[1.7, 1.8], real_experts_per_token=[1.0, 1.0])]
    checks = bench.allocation_checks(inside, 1.8, None, None)
    assert checks["a_budget_ok"] is True  # 1.83 is 1.7% off; the last step alone (1.0) is not used
    assert checks["a_worst_rel_budget_deviation"] == pytest.approx(0.03 / 1.8)
    # Validation's count is reported beside it, not checked.
    assert checks["a_val_worst_rel_budget_deviation"] == pytest.approx(0.1 / 1.8)
    outside = [inside[0], _ok_run("dither_b1.8", 2, 2.0, real_experts_per_token=[1.8, 1.85])]
    checks = bench.allocation_checks(outside, 1.8, None, None)
    assert checks["a_budget_ok"] is False  # seed 2 has no window: its last training 1.85 is 2.8% off
    assert bench.allocation_checks([_ok_run("dither_b1.8", 1, 2.0)], 1.8, None, None)["a_budget_ok"] is None


def test_training_window_averages_the_last_tenth_of_steps(tmp_path):
    records = [{"step": step, "loss": 2.0, **_layers("real_experts_per_token", [1.0 + step / 1000, 2.0])}
               for step in range(10, STEPS + 1, 10)]
    records.append(_final_record(2.0, real=(1.9, 2.0)))
    row = bench.extract_run(_write_run(tmp_path / "run", records), STEPS)
    window_steps = [step for step in range(10, STEPS + 1, 10) if step > STEPS - STEPS // 10] + [STEPS]
    expected = statistics.fmean([1.0 + step / 1000 for step in window_steps[:-1]] + [1.9])
    assert row["real_experts_per_token_window"] == pytest.approx([expected, 2.0])


def test_check_b_allocation_needs_every_layer_off_the_mode_and_uncorrelated():
    good = [_ok_run("dither_b1.8", 1, 2.0, k_off_mode_frac=[0.25, 0.4], k_position_corr=[0.1, -0.19])]
    assert bench.allocation_checks(good, 1.8, None, None)["b_allocation_ok"] is True
    mode_collapse = [_ok_run("dither_b1.8", 1, 2.0, k_off_mode_frac=[0.25, 0.1], k_position_corr=[0.0, 0.0])]
    assert bench.allocation_checks(mode_collapse, 1.8, None, None)["b_allocation_ok"] is False
    positional = [_ok_run("dither_b1.8", 1, 2.0, k_off_mode_frac=[0.5, 0.5], k_position_corr=[0.0, -0.3])]
    checks = bench.allocation_checks(positional, 1.8, None, None)
    assert checks["b_allocation_ok"] is False and checks["b_max_abs_k_position_corr"] == 0.3


def test_check_c_shuffle_gap_must_exceed_the_seed_spread():
    assert bench.allocation_checks([], 1.8, 0.05, 0.1)["c_shuffle_hurts"] is True
    assert bench.allocation_checks([], 1.8, 0.05, 0.02)["c_shuffle_hurts"] is False
    assert bench.allocation_checks([], 1.8, None, 0.1)["c_shuffle_hurts"] is None  # one seed: no spread


def test_dry_run_prints_commands_with_overrides_and_launches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "launch_run", lambda *a: pytest.fail("dry run launched a run"))
    _write_run(tmp_path / "top2_s1", [_final_record(2.0)])
    _write_run(tmp_path / "dither_b1.8_s2", [{"step": 5, "loss": 3.0}])
    code = bench.main(["--methods", "top2,dither_b1.8", "--seeds", "1,2", "--steps", str(STEPS),
                       "--eval-interval", "5", "--out-dir", str(tmp_path), "--extra", "trainer.eval_iters=1", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("OMP_NUM_THREADS=1 ")]
    assert len(lines) == 3  # top2_s1 is finished
    assert "# skip top2_s1: finished" in out and f"# would delete unfinished {tmp_path / 'dither_b1.8_s2'}" in out
    dither = next(line for line in lines if "dither_b1.8_s2" in line)
    for part in ("-m launcher.train", "experiment=shakespeare_cpu", "parallel.expert_model_parallel_size=1",
                 f"trainer.max_steps={STEPS}", "trainer.seed=2", "trainer.eval_interval=5", "logging.console=true",
                 "moe=anyexperts", "moe.anyexperts.k_rounding=dither", "moe.anyexperts.budget_target=1.8",
                 "trainer.eval_iters=1"):
        assert part in dither
    assert (tmp_path / "dither_b1.8_s2").exists()  # a dry run deletes nothing


def _fake_training(launched: list[str], fail: set[str] = frozenset()):
    """A launch_run stand-in: writes a finished metrics.jsonl (or fails) instead of training."""
    def launch(command: list[str], log_path: Path) -> int:
        run_dir = Path(next(c for c in command if c.startswith("experiment.run_dir=")).partition("=")[2])
        launched.append(run_dir.name)
        if run_dir.name in fail:
            log_path.write_text("starting\nTraceback ...\nRuntimeError: boom\n")
            return 1
        seed = int(next(c for c in command if c.startswith("trainer.seed=")).partition("=")[2])
        _write_run(run_dir, [_final_record(2.0 + seed / 10, real=(2.0, 2.0))])
        log_path.write_text("ok\n")
        return 0
    return launch


def test_resume_skips_finished_runs_and_reruns_unfinished_ones(tmp_path, monkeypatch, capsys):
    launched: list[str] = []
    monkeypatch.setattr(bench, "launch_run", _fake_training(launched))
    _write_run(tmp_path / "top2_s1", [_final_record(1.5, real=(2.0, 2.0))])
    stale = _write_run(tmp_path / "top2_s2", [{"step": 5, "loss": 3.0}])
    (stale / "stale_checkpoint").write_text("x")
    out_json = tmp_path / "bench.json"
    code = bench.main(["--methods", "top2,top1", "--seeds", "1,2", "--steps", str(STEPS), "--jobs", "1",
                       "--out-dir", str(tmp_path), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(launched) == ["top1_s1", "top1_s2", "top2_s2"]  # top2_s1 was finished
    assert "skip top2_s1: finished" in out and "rerun top2_s2: unfinished" in out
    assert not (stale / "stale_checkpoint").exists()
    result = json.loads(out_json.read_text())
    assert set(result) == {"config", "runs", "methods"}
    assert result["config"]["seeds"] == [1, 2] and result["config"]["methods"]["top1"]["budget"] == 1.0
    top2_s1 = next(r for r in result["runs"] if r["method"] == "top2" and r["seed"] == 1)
    assert top2_s1["val_loss"] == 1.5  # kept from the finished run, not retrained
    top1 = next(m for m in result["methods"] if m["method"] == "top1")
    assert top1["vs_top2"]["diffs_by_seed"] == pytest.approx({"1": 2.1 - 1.5, "2": 0.0})
    assert "top1" in out and "top2" in out  # the table


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    launched: list[str] = []
    monkeypatch.setattr(bench, "launch_run", _fake_training(launched, fail={"top1_s1"}))
    code = bench.main(["--methods", "top1,top2", "--seeds", "1", "--steps", str(STEPS), "--jobs", "2",
                       "--out-dir", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(launched) == ["top1_s1", "top2_s1"]
    assert "FAILED top1_s1" in captured.err and "RuntimeError: boom" in captured.err
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed", "ok"]
    assert runs[1]["val_loss"] == pytest.approx(2.1)


def test_unknown_method_is_an_error(capsys):
    assert bench.main(["--methods", "top3", "--dry-run"]) == 2
    assert "unknown methods" in capsys.readouterr().err


def test_extra_validation_losses_get_spreads_and_paired_differences(tmp_path):
    run = _write_run(tmp_path / "top1_s1", [{**_final_record(2.0), "val_loss/canterbury": 2.7}])
    assert bench.extract_run(run, STEPS)["extra_val_loss"] == {"canterbury": 2.7}
    runs = [_ok_run("top2", seed, 2.0, extra_val_loss={"canterbury": value})
            for seed, value in ((1, 2.5), (2, 2.7), (3, 2.9))]
    runs += [_ok_run("top1", seed, 2.2, extra_val_loss={"canterbury": value})
             for seed, value in ((1, 2.7), (2, 2.95), (3, 3.05))]
    runs.append(_ok_run("top1", 4, 2.2))  # no extra validation logged: left out of its statistics
    top2, top1 = bench.aggregate(runs, ["top2", "top1"])
    canterbury = top1["extra_validation"]["canterbury"]
    assert canterbury["val_loss"]["n"] == 3
    assert canterbury["val_loss"]["mean"] == pytest.approx((2.7 + 2.95 + 3.05) / 3)
    assert canterbury["vs_top2"]["diffs_by_seed"] == pytest.approx({1: 0.2, 2: 0.25, 3: 0.15})
    assert canterbury["vs_top2"]["std"] == pytest.approx(0.05)
    assert canterbury["vs_top2"]["reading"] == "worse"
    assert top2["extra_validation"]["canterbury"]["vs_top2"]["reading"] is None
    assert top2["extra_validation"]["canterbury"]["val_loss"]["std"] == pytest.approx(0.2)


def test_extra_validation_flag_adds_the_override_and_reports_a_table(tmp_path, monkeypatch, capsys):
    def launch(command: list[str], log_path: Path) -> int:
        run_dir = Path(next(c for c in command if c.startswith("experiment.run_dir=")).partition("=")[2])
        assert "data.extra_validation=[canterbury]" in command
        seed = int(next(c for c in command if c.startswith("trainer.seed=")).partition("=")[2])
        bonus = 0.1 if run_dir.name.startswith("top1") else 0.0
        _write_run(run_dir, [{**_final_record(2.0), "val_loss/canterbury": 2.5 + seed / 10 + bonus}])
        log_path.write_text("ok\n")
        return 0

    monkeypatch.setattr(bench, "launch_run", launch)
    out_json = tmp_path / "bench.json"
    code = bench.main(["--methods", "top2,top1", "--seeds", "1,2", "--steps", str(STEPS), "--jobs", "1",
                       "--out-dir", str(tmp_path / "runs"), "--json", str(out_json), "--extra-validation", "canterbury"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out_json.read_text())
    assert "data.extra_validation=[canterbury]" in result["config"]["extra"]
    top1 = next(m for m in result["methods"] if m["method"] == "top1")
    assert top1["extra_validation"]["canterbury"]["vs_top2"]["diffs_by_seed"] == pytest.approx({"1": 0.1, "2": 0.1})
    assert top1["extra_validation"]["canterbury"]["val_loss"]["mean"] == pytest.approx(2.75)
    table = out[out.index("val_loss/canterbury (a corpus no run trained on):"):].splitlines()
    assert table[2].split()[:4] == ["top2", "2", "2.6500", "±"]
    assert table[3].split()[0] == "top1" and "+0.1000" in table[3]
