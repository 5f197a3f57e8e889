"""How much a trained AnyExperts model's validation loss depends on K at all, and what its own
allocation buys against giving every token the same K.

    OMP_NUM_THREADS=1 python tools/eval_uniform_k.py --grid-dir runs/bench_allocation \
        --methods straight_through_b1.8,straight_through_b2.0 --seeds 1,2,3 --json runs/uniform_k.json

For every finished run of a `tools/bench_allocation.py` grid (<grid-dir>/<method>_s<seed>,
its final checkpoint), the same validation batches are evaluated again (trainer.eval_only)
with every token at K = k for each k in [k_min, k_max] and no virtual slots
(<grid-dir>/<method>_s<seed>_k<k>, skipped when already there). Per method and k: the mean
and spread over seeds of val_loss(K = k) - val_loss(own allocation), paired by seed, beside
the shuffled allocation's gap from the grid itself. Read it as: the range over k is all the
loss that compute can move in this model; a learned allocation is worth something where its
own val_loss beats the uniform K of at least the same compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_allocation import (METHODS, _final_validation_index, _override_value, extract_run, is_anyexperts,
                              read_records, run_dir_for, spread)
from bench_throughput import final_checkpoint
from compare_runs import _fmt

REPO = Path(__file__).resolve().parents[1]


def slot_range(method: str) -> tuple[int, int]:
    overrides = METHODS[method]
    return (int(_override_value(overrides, "moe.anyexperts.k_min")),
            int(_override_value(overrides, "moe.anyexperts.k_max")))


def uniform_k_val_loss(method: str, seed: int, run_dir: Path, k: int, steps: int, eval_interval: int) -> float:
    eval_dir = run_dir.with_name(f"{run_dir.name}_k{k}")
    if (final := _final_validation_index(records := read_records(eval_dir), steps)) is not None:
        return records[final]["val_loss"]
    checkpoint = final_checkpoint(run_dir)
    command = [sys.executable, "-m", "launcher.train", "experiment=shakespeare_cpu",
               "parallel.expert_model_parallel_size=1", *METHODS[method], f"trainer.max_steps={steps}",
               f"trainer.seed={seed}", f"trainer.eval_interval={eval_interval}", f"experiment.run_dir={eval_dir}",
               f"checkpoint.resume={checkpoint}", "trainer.eval_only=true", "trainer.pictures_at_end=false",
               "logging.tensorboard=false", f"moe.anyexperts.k_min={k}", f"moe.anyexperts.k_max={k}",
               "moe.anyexperts.rho_max=0", "moe.anyexperts.virtual_target=null",
               "moe.anyexperts.virtual_bias_rate=0", "moe.anyexperts.budget_target=null",
               "moe.anyexperts.budget_bias_rate=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    records = read_records(eval_dir)
    final = _final_validation_index(records, steps)
    if result.returncode != 0 or final is None:
        raise SystemExit(f"error: eval at K={k} of {run_dir} failed (exit {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    return records[final]["val_loss"]


def _pm(stats: dict) -> str:
    return f"{_fmt(stats['mean'], '+.4f')} ± {_fmt(stats['std'], '.4f')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-dir", type=Path, required=True, help="a tools/bench_allocation.py --out-dir")
    parser.add_argument("--methods", default="straight_through_b1.8,straight_through_b2.0")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=1000, help="the grid's --steps")
    parser.add_argument("--eval-interval", type=int, default=100, help="the grid's --eval-interval")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    bad = [m for m in methods if m not in METHODS or not is_anyexperts(m)]
    if bad:
        raise SystemExit(f"error: {bad} are not AnyExperts methods of tools/bench_allocation.py")
    rows = []
    for method in methods:
        k_min, k_max = slot_range(method)
        runs = []
        for seed in seeds:
            run_dir = run_dir_for(args.grid_dir, method, seed)
            own = extract_run(run_dir, args.steps)
            at_k = {k: uniform_k_val_loss(method, seed, run_dir, k, args.steps, args.eval_interval)
                    for k in range(k_min, k_max + 1)}
            runs.append({"seed": seed, "val_loss": own["val_loss"],
                         "val_loss_shuffled_allocation": own["val_loss_shuffled_allocation"],
                         "real_experts_per_token_val": own["val_real_experts_per_token"],
                         "val_loss_at_uniform_k": at_k})
            print(f"{method} seed {seed}: own {own['val_loss']:.4f}, "
                  + ", ".join(f"K={k} {v:.4f}" for k, v in at_k.items()), flush=True)
        rows.append({"method": method, "runs": runs,
                     "shuffle_gap": spread([r["val_loss_shuffled_allocation"] - r["val_loss"] for r in runs
                                            if r["val_loss_shuffled_allocation"] is not None]),
                     "uniform_k_gap": {k: spread([r["val_loss_at_uniform_k"][k] - r["val_loss"] for r in runs])
                                       for k in range(k_min, k_max + 1)}})
    print(f"\n{'method':<24} {'shuffled - own':>17} " + " ".join(f"{f'K={k} - own':>17}" for k in range(1, 5)))
    for row in rows:
        cells = [_pm(row["uniform_k_gap"][k]) if k in row["uniform_k_gap"] else "-" for k in range(1, 5)]
        print(f"{row['method']:<24} {_pm(row['shuffle_gap']):>17} " + " ".join(f"{c:>17}" for c in cells))
    print("mean ± std over seeds, paired by seed; every token at K = k, no virtual slots, same validation batches.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "methods": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
