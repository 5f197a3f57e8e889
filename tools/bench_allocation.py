"""Grid benchmark of expert-allocation methods: method x budget x seed training runs on CPU,
summarised as one table row per method (printed, and as JSON with --json).

    python tools/bench_allocation.py --dry-run                       # print the grid's commands
    python tools/bench_allocation.py --jobs 2 --json runs/bench_allocation.json
    python tools/bench_allocation.py --methods top2,dither_b1.8 --seeds 1 --steps 200 --extra trainer.eval_iters=8
    python tools/bench_allocation.py --extra-validation canterbury  # also val_loss on a corpus not trained on

Each run is one process (launcher.train, experiment=shakespeare_cpu, expert-parallel size 1,
OMP_NUM_THREADS=1) writing <out-dir>/<method>_s<seed>/metrics.jsonl, with its stdout/stderr
in <out-dir>/<method>_s<seed>.log. Running the same command again resumes the grid: a run
with a validation record at the last step is kept, an unfinished run directory is deleted
and run again. A failed run is reported with the end of its log; the others go on.

Per method: val_loss mean, sample std and min/max over seeds; the shuffle gap
(val_loss_shuffled_allocation - val_loss); val_loss minus top2's on the same seed, read as
better/worse only when the mean of those paired differences exceeds their std; and, for
the rows that allocate per token (AnyExperts, top-p, ReMoE), three checks over every layer
of every seed (the worst one decides; the rivals log no shuffle gap, so c stays empty):
  a_budget_ok      real experts per token computed in training over the last 10% of steps
                   (every logged step, ~200k tokens per layer) within 2% of the budget; the
                   final validation's count (4k tokens, ~1-2% sampling noise) is reported
                   beside it as a_val_worst_rel_budget_deviation
  b_allocation_ok  k_off_mode_frac >= 0.2 and |k_position_corr| < 0.2
  c_shuffle_hurts  shuffle gap mean > std of val_loss over seeds
With --extra-validation NAME[,NAME] (data.extra_validation, or any run logging val_loss/<name>),
each such loss at the last step gets the same mean ± std over seeds and paired difference
against top2, in the JSON under "extra_validation" and in a second table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from compare_runs import _fmt, _layer_values

REPO = Path(__file__).resolve().parents[1]


# How virtual slots are trained, spelled out in every AnyExperts row (not left to moe=anyexperts'
# defaults), so that a row means the same thing after a default changes.
# By the budget only: zero experts, gates over the real entries, the count moved by the budget's
# virtual term (moe=anyexperts until virtual_held_budgeted replaced it).
_BY_BUDGET = {"gate_norm": "real", "virtual_target": "null", "virtual_bias_rate": "0.0", "budget_on_virtual": "true"}
# Trained by the loss: gates over every selected entry, the count held at 0.2 per token.
_HELD = {**_BY_BUDGET, "gate_norm": "all", "virtual_target": "0.2", "virtual_bias_rate": "0.5",
         "budget_on_virtual": "false"}
# The same with the budget's virtual term on (moe=anyexperts): without it the budget had only K
# to move, its controller swung the real count early, and 2 of 3 seeds stalled on the unigram plateau.
_HELD_BUDGETED = {**_HELD, "budget_on_virtual": "true"}


def _anyexperts(rounding: str, budget: float, k_max: int, virtual: dict = _BY_BUDGET) -> list[str]:
    return ["moe=anyexperts", f"moe.anyexperts.k_rounding={rounding}", "moe.anyexperts.k_min=1",
            f"moe.anyexperts.k_max={k_max}", f"moe.anyexperts.budget_target={budget}",
            *(f"moe.anyexperts.{key}={value}" for key, value in virtual.items())]


def _rival(kind: str, budget: float) -> list[str]:
    return [f"moe={kind}", f"moe.{kind}.target_real_experts={budget}"]


# k_max = 3 leaves budget 1.8 room on both sides; budget 2.0 needs k_max = 4 for the same.
METHODS: dict[str, list[str]] = {
    "top1": ["moe=topk", "moe.router_topk=1"],
    "top2": ["moe=topk", "moe.router_topk=2"],
    **{f"{rounding}_b{budget}": _anyexperts(rounding, budget, k_max)
       for budget, k_max in ((1.8, 3), (2.0, 4))
       for rounding in ("fractional", "straight_through", "dither")},
    # Virtual slots the loss trains: zero experts with gates over every selected entry, their count
    # held at 0.2 per token (virtual_held; virtual_held_budgeted with the budget's virtual term);
    # its halves alone; MoE++'s copy / constant experts, held.
    **{f"virtual_{name}_b{budget}": _anyexperts("straight_through", budget, k_max, virtual)
       for budget, k_max in ((1.8, 3), (2.0, 4))
       for name, virtual in (("held", _HELD),
                             ("held_budgeted", _HELD_BUDGETED),
                             ("all_unheld", {**_BY_BUDGET, "gate_norm": "all"}),
                             ("real_held", {**_HELD, "gate_norm": "real"}),
                             ("copy", {**_HELD, "virtual_kind": "copy"}),
                             ("constant_real", {**_HELD, "virtual_kind": "constant", "gate_norm": "real"}))},
    # The rivals, their controllers holding the same mean real experts per token.
    "topp_b2.0": _rival("topp", 2.0),
    "remoe_b2.0": _rival("remoe", 2.0),
    # moe=remoe shifts its gates to reopen the ones the loss closed; the paper's router does not.
    "remoe_paper_b2.0": [*_rival("remoe", 2.0), "moe.remoe.threshold_rate=0.0"],
}
BASELINE = "top2"

PER_LAYER_STATS = ("real_experts_per_token", "val_real_experts_per_token", "k_off_mode_frac", "k_position_corr",
                   "k_std", "importance_loss_spearman", "virtual_experts_per_token")
# trainer.evaluate_extra's keys: val_loss/<corpus name>.
EXTRA_VAL_LOSS_PREFIX = "val_loss/"
BUDGET_TOLERANCE = 0.02
MIN_K_OFF_MODE_FRAC = 0.2
MAX_ABS_K_POSITION_CORR = 0.2


def _override_value(overrides: list[str], key: str) -> str | None:
    for override in reversed(overrides):  # Hydra: the last one wins
        name, _, value = override.partition("=")
        if name == key:
            return value
    return None


def is_anyexperts(method: str) -> bool:
    return _override_value(METHODS[method], "moe") == "anyexperts"


_BUDGET_KEYS = {"anyexperts": "moe.anyexperts.budget_target", "topk": "moe.router_topk",
                "topp": "moe.topp.target_real_experts", "remoe": "moe.remoe.target_real_experts"}


def allocates_per_token(method: str) -> bool:
    """AnyExperts and the rivals (top-p, ReMoE) choose a number of experts per token."""
    return _override_value(METHODS[method], "moe") in ("anyexperts", "topp", "remoe")


def method_budget(method: str) -> float:
    """Experts per token the method pays for: budget_target for AnyExperts, k for top-k, the
    controllers' target for top-p and ReMoE."""
    key = _BUDGET_KEYS[_override_value(METHODS[method], "moe")]
    return float(_override_value(METHODS[method], key))


# --- reading runs ------------------------------------------------------------------------

def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a killed run can leave half a line; the run is unfinished anyway
            continue
    return records


def _final_validation_index(records: list[dict], steps: int) -> int | None:
    for index in range(len(records) - 1, -1, -1):
        if records[index].get("step") == steps and "val_loss" in records[index]:
            return index
    return None


def is_finished(run_dir: Path, steps: int) -> bool:
    return _final_validation_index(read_records(run_dir), steps) is not None


def extract_run(run_dir: Path, steps: int) -> dict:
    """val_loss (and shuffled) at the final step; per-layer stats from the final validation
    record, else from the last record before it that has them (training-step values)."""
    records = read_records(run_dir)
    final = _final_validation_index(records, steps)
    if final is None:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no validation record at step {steps}")
    row = {
        "val_loss": records[final]["val_loss"],
        "val_loss_shuffled_allocation": records[final].get("val_loss_shuffled_allocation"),
        "extra_val_loss": {key.removeprefix(EXTRA_VAL_LOSS_PREFIX): value for key, value in records[final].items()
                           if key.startswith(EXTRA_VAL_LOSS_PREFIX)},
    }
    for name in PER_LAYER_STATS:
        row[name] = next((values for r in reversed(records[:final + 1]) if (values := _layer_values(r, name))), None)
    window = [values for r in records[:final + 1] if r.get("step", 0) > steps - steps // 10
              and (values := _layer_values(r, "real_experts_per_token"))]
    row["real_experts_per_token_window"] = ([statistics.fmean(layer) for layer in zip(*window)]
                                            if window else row["real_experts_per_token"])
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    row["tokens_per_s"] = statistics.median(speeds) if speeds else None
    return row


# --- aggregating -------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """Mean, sample std (None below two values), min and max."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def paired_reading(diffs: list[float]) -> str | None:
    """A paired difference smaller than its own spread over seeds is no difference."""
    if not diffs:
        return None
    if len(diffs) == 1:
        return "one seed"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    if abs(mean) > std:
        return "better" if mean < 0 else "worse"
    return "no difference"


def _all_layers(runs: list[dict], *names: str) -> list[float] | None:
    """Every layer of every run from the first of `names` each run has; None if a run has none."""
    values = []
    for run in runs:
        layers = next((run[name] for name in names if run.get(name)), None)
        if layers is None:
            return None
        values.extend(layers)
    return values or None


def allocation_checks(runs: list[dict], budget: float, val_loss_std: float | None,
                      shuffle_gap_mean: float | None) -> dict:
    """Checks (a), (b), (c) on the worst layer; None where a stat was not logged."""
    real = _all_layers(runs, "real_experts_per_token_window", "real_experts_per_token")
    val_real = _all_layers(runs, "val_real_experts_per_token")
    off_mode = _all_layers(runs, "k_off_mode_frac")
    position_corr = _all_layers(runs, "k_position_corr")
    worst_deviation = max(abs(v - budget) / budget for v in real) if real else None
    min_off_mode = min(off_mode) if off_mode else None
    max_abs_corr = max(abs(v) for v in position_corr) if position_corr else None
    return {
        "a_worst_rel_budget_deviation": worst_deviation,
        "a_budget_ok": None if worst_deviation is None else worst_deviation <= BUDGET_TOLERANCE,
        "a_val_worst_rel_budget_deviation": max(abs(v - budget) / budget for v in val_real) if val_real else None,
        "b_min_k_off_mode_frac": min_off_mode,
        "b_max_abs_k_position_corr": max_abs_corr,
        "b_allocation_ok": (None if min_off_mode is None or max_abs_corr is None
                            else min_off_mode >= MIN_K_OFF_MODE_FRAC and max_abs_corr < MAX_ABS_K_POSITION_CORR),
        "c_shuffle_hurts": (None if shuffle_gap_mean is None or val_loss_std is None
                            else shuffle_gap_mean > val_loss_std),
    }


def _mean_over_layers_and_runs(runs: list[dict], name: str) -> float | None:
    means = [statistics.fmean(run[name]) for run in runs if run.get(name)]
    return statistics.fmean(means) if means else None


def _versus_baseline(method: str, values_by_seed: dict[int, float], baseline_by_seed: dict[int, float]) -> dict:
    """Per-seed paired differences against the baseline, their spread and reading."""
    paired = ({} if method == BASELINE else
              {seed: value - baseline_by_seed[seed] for seed, value in values_by_seed.items() if seed in baseline_by_seed})
    diffs = list(paired.values())
    return {"diffs_by_seed": paired, **spread(diffs), "reading": paired_reading(diffs)}


def extra_validation_names(runs: list[dict]) -> list[str]:
    return sorted({name for run in runs if run.get("status") == "ok" for name in run.get("extra_val_loss") or {}})


def _extra_by_seed(runs: list[dict], name: str) -> dict[int, float]:
    return {run["seed"]: run["extra_val_loss"][name] for run in runs
            if run["status"] == "ok" and name in (run.get("extra_val_loss") or {})}


def aggregate_method(method: str, runs: list[dict], baseline_by_seed: dict[int, float],
                     baseline_extra_by_seed: dict[str, dict[int, float]] | None = None) -> dict:
    ok = [run for run in runs if run["status"] == "ok"]
    val_loss = spread([run["val_loss"] for run in ok])
    gaps = [run["val_loss_shuffled_allocation"] - run["val_loss"]
            for run in ok if run.get("val_loss_shuffled_allocation") is not None]
    shuffle_gap = spread(gaps)
    extra = {}
    for name, baseline in (baseline_extra_by_seed or {}).items():
        values_by_seed = _extra_by_seed(ok, name)
        extra[name] = {"val_loss": spread(list(values_by_seed.values())),
                       "vs_top2": _versus_baseline(method, values_by_seed, baseline)}
    if allocates_per_token(method):
        checks = allocation_checks(ok, method_budget(method), val_loss["std"], shuffle_gap["mean"])
    else:
        checks = dict.fromkeys(("a_budget_ok", "a_val_worst_rel_budget_deviation", "b_allocation_ok",
                                "c_shuffle_hurts"))
    return {
        "method": method,
        "budget": method_budget(method),
        "seeds": [run["seed"] for run in ok],
        "failed_seeds": [run["seed"] for run in runs if run["status"] != "ok"],
        "val_loss": val_loss,
        "shuffle_gap": shuffle_gap,
        "vs_top2": _versus_baseline(method, {run["seed"]: run["val_loss"] for run in ok}, baseline_by_seed),
        "extra_validation": extra,
        "real_experts_per_token_train": _mean_over_layers_and_runs(ok, "real_experts_per_token"),
        "real_experts_per_token_val": _mean_over_layers_and_runs(ok, "val_real_experts_per_token"),
        "tokens_per_s": spread([run["tokens_per_s"] for run in ok if run["tokens_per_s"] is not None])["mean"],
        **checks,
    }


def aggregate(runs: list[dict], methods: list[str]) -> list[dict]:
    baseline_runs = [run for run in runs if run["method"] == BASELINE]
    baseline_by_seed = {run["seed"]: run["val_loss"] for run in baseline_runs if run["status"] == "ok"}
    baseline_extra_by_seed = {name: _extra_by_seed(baseline_runs, name) for name in extra_validation_names(runs)}
    return [aggregate_method(m, [run for run in runs if run["method"] == m], baseline_by_seed, baseline_extra_by_seed)
            for m in methods]


# --- running the grid --------------------------------------------------------------------

def run_dir_for(out_dir: Path, method: str, seed: int) -> Path:
    return out_dir / f"{method}_s{seed}"


def log_path_for(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")


def train_command(method: str, seed: int, run_dir: Path, steps: int, eval_interval: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "experiment=shakespeare_cpu",
            "parallel.expert_model_parallel_size=1", f"trainer.max_steps={steps}", f"trainer.seed={seed}",
            f"trainer.eval_interval={eval_interval}", f"experiment.run_dir={run_dir}", "logging.console=true",
            *METHODS[method], *extra]


def shell_line(command: list[str]) -> str:
    return "OMP_NUM_THREADS=1 " + shlex.join(command)


def launch_run(command: list[str], log_path: Path) -> int:
    # One thread per run: --jobs runs share the machine's cores instead of fighting over them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode


def log_tail(log_path: Path, num_lines: int = 20) -> list[str]:
    return log_path.read_text(errors="replace").splitlines()[-num_lines:] if log_path.exists() else []


def plan_grid(methods: list[str], seeds: list[int], out_dir: Path, steps: int) -> list[dict]:
    plan = []
    for method in methods:
        for seed in seeds:
            run_dir = run_dir_for(out_dir, method, seed)
            state = "finished" if is_finished(run_dir, steps) else "unfinished" if run_dir.exists() else "new"
            plan.append({"method": method, "seed": seed, "run_dir": run_dir, "state": state})
    return plan


def run_grid(plan: list[dict], args) -> set[tuple[str, int]]:
    """Launches every run that is not finished, `args.jobs` at a time; returns the failed ones."""
    todo = [entry for entry in plan if entry["state"] != "finished"]
    for entry in plan:
        if entry["state"] == "finished":
            print(f"skip {entry['run_dir'].name}: finished")
        elif entry["state"] == "unfinished":
            # A half-written run cannot be trusted to resume the same data order: start it over.
            print(f"rerun {entry['run_dir'].name}: unfinished, deleting {entry['run_dir']}")
            shutil.rmtree(entry["run_dir"])

    def run_one(entry: dict) -> bool:
        command = train_command(entry["method"], entry["seed"], entry["run_dir"], args.steps, args.eval_interval, args.extra)
        returncode = launch_run(command, log_path_for(entry["run_dir"]))
        return returncode == 0 and is_finished(entry["run_dir"], args.steps)

    failed = set()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, entry): entry for entry in todo}
        for done, future in enumerate(as_completed(futures), 1):
            entry = futures[future]
            ok = future.result()
            if not ok:
                failed.add((entry["method"], entry["seed"]))
            print(f"[{done}/{len(todo)} {time.monotonic() - start:.0f}s] {entry['run_dir'].name}: "
                  f"{'done' if ok else 'FAILED'}", flush=True)
    return failed


def collect_runs(plan: list[dict], failed: set[tuple[str, int]], steps: int) -> list[dict]:
    runs = []
    for entry in plan:
        row = {"method": entry["method"], "seed": entry["seed"], "run_dir": str(entry["run_dir"])}
        if (entry["method"], entry["seed"]) in failed:
            row.update(status="failed", log_tail=log_tail(log_path_for(entry["run_dir"])))
        else:
            row.update(status="ok", **extract_run(entry["run_dir"], steps))
        runs.append(row)
    return runs


# --- printing ----------------------------------------------------------------------------

def _pm(stats: dict, spec: str = "7.4f") -> str:
    return f"{_fmt(stats['mean'], spec)} ± {_fmt(stats['std'], spec.replace('7', '6'))}"


def _check(value: bool | None) -> str:
    return "-" if value is None else "ok" if value else "FAIL"


def print_table(rows: list[dict]) -> None:
    print(f"{'method':<22} {'budget':>6} {'n':>2} {'val_loss mean ± std':>19} {'[min, max]':>17} "
          f"{'shuffle gap':>17} {'vs top2 (paired)':>17} {'reading':<13} {'real/tok':>8} {'val r/tok':>9} "
          f"{'a':>4} {'a val':>6} {'b':>4} {'c':>4} {'tok/s':>6}")
    for row in rows:
        val, vs = row["val_loss"], row["vs_top2"]
        print(f"{row['method']:<22} {row['budget']:>6.2f} {val['n']:>2} {_pm(val):>19} "
              f"[{_fmt(val['min'], '7.4f')}, {_fmt(val['max'], '7.4f')}] {_pm(row['shuffle_gap']):>17} "
              f"{_pm(vs, '+7.4f'):>17} {vs['reading'] or '-':<13} "
              f"{_fmt(row['real_experts_per_token_train'], '8.3f'):>8} {_fmt(row['real_experts_per_token_val'], '9.3f'):>9} "
              f"{_check(row['a_budget_ok']):>4} {_fmt(row.get('a_val_worst_rel_budget_deviation'), '6.1%'):>6} "
              f"{_check(row['b_allocation_ok']):>4} {_check(row['c_shuffle_hurts']):>4} "
              f"{_fmt(row['tokens_per_s'], '6.0f'):>6}")
    print(f"vs top2: mean ± std over seeds of val_loss - top2's on the same seed; 'better'/'worse' only when "
          f"|mean| > std. a: training real/tok (last 10% of steps) within {BUDGET_TOLERANCE:.0%} of budget on every "
          f"layer; a val: worst validation deviation; b: every layer "
          f"k_off_mode_frac >= {MIN_K_OFF_MODE_FRAC} and |k_position_corr| < {MAX_ABS_K_POSITION_CORR}; "
          f"c: shuffle gap > val_loss std.")
    print_extra_validation_table(rows)


def print_extra_validation_table(rows: list[dict]) -> None:
    """One block per extra validation corpus: its loss at the last step, as for val_loss."""
    for name in sorted({name for row in rows for name in row.get("extra_validation", {})}):
        print(f"\n{EXTRA_VAL_LOSS_PREFIX}{name} (a corpus no run trained on):")
        print(f"{'method':<22} {'n':>2} {'mean ± std':>19} {'[min, max]':>17} {'vs top2 (paired)':>17} {'reading':<13}")
        for row in rows:
            extra = row["extra_validation"].get(name)
            if extra is None:
                continue
            val, vs = extra["val_loss"], extra["vs_top2"]
            print(f"{row['method']:<22} {val['n']:>2} {_pm(val):>19} [{_fmt(val['min'], '7.4f')}, "
                  f"{_fmt(val['max'], '7.4f')}] {_pm(vs, '+7.4f'):>17} {vs['reading'] or '-':<13}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="1,2,3", help="comma list of trainer.seed values")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench_allocation"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="override added to every run (repeatable)")
    parser.add_argument("--extra-validation", default="",
                        help="comma list of bundled corpora (canterbury, shakespeare) every run is also evaluated on "
                             "(data.extra_validation)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    extra_validation = [name.strip() for name in args.extra_validation.split(",") if name.strip()]
    if extra_validation:
        args.extra = [f"data.extra_validation=[{','.join(extra_validation)}]", *args.extra]

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown methods {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out_dir = args.out_dir.resolve()  # runs start in the repo root, wherever this is called from
    plan = plan_grid(methods, seeds, out_dir, args.steps)

    if args.dry_run:
        for entry in plan:
            if entry["state"] == "finished":
                print(f"# skip {entry['run_dir'].name}: finished")
                continue
            if entry["state"] == "unfinished":
                print(f"# would delete unfinished {entry['run_dir']}")
            print(shell_line(train_command(entry["method"], entry["seed"], entry["run_dir"],
                                           args.steps, args.eval_interval, args.extra)))
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    failed = run_grid(plan, args)
    runs = collect_runs(plan, failed, args.steps)
    rows = aggregate(runs, methods)
    print_table(rows)
    if args.json:
        config = {"methods": {m: {"budget": method_budget(m), "overrides": METHODS[m]} for m in methods},
                  "seeds": seeds, "steps": args.steps, "eval_interval": args.eval_interval,
                  "extra": args.extra, "out_dir": str(out_dir)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "runs": runs, "methods": rows}, indent=2))
    for run in runs:
        if run["status"] == "failed":
            print(f"\nFAILED {Path(run['run_dir']).name} (log {log_path_for(Path(run['run_dir']))}):", file=sys.stderr)
            print("\n".join("    " + line for line in run["log_tail"]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
