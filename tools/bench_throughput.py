"""Full-step training throughput of every routing method at the same shapes, in one run.

    OMP_NUM_THREADS=1 python tools/bench_throughput.py --grid-dir runs/bench_allocation \
        --methods top1,top2,straight_through_b1.8,straight_through_b2.0,topp_b2.0,remoe_b2.0 \
        --json runs/bench_throughput.json

Each method continues its trained run of a `tools/bench_allocation.py` grid (<grid-dir>/
<method>_s<seed>/checkpoints, the final checkpoint: routing as trained, not as initialised,
which matters for the methods whose expert count is learned) for --steps more training steps
(forward, backward, optimizer; one process, EP=1, no validation, no save), one method at a
time, in --rounds interleaved rounds (method order rotated each round, so a slow spell of a
shared machine does not land on one method). Per method: the median over rounds of
tokens_per_s (the trainer's own windows after the first), and the mean real experts per
token of the same steps. Printed and written as JSON: tokens/s against top-2 and real
experts per token against top-2, so the two ratios can be read side by side. Run it on an
idle machine; only ratios from one run are comparable.

    OMP_NUM_THREADS=1 python tools/bench_throughput.py --main-job --json runs/bench_throughput_main.json

--main-job: the main job itself (`make train`: experiment=shakespeare_cpu, 2 processes under
torchrun, expert-parallel 2, one thread each) from its first step, no grid needed, for
`moe=topk` (megatron's MoELayer and SequentialMLP, top-2), `moe=topk moe.grouped_gemm=true`
(the project's top-k path: megatron's MoELayer with GroupedExperts) and `moe=anyexperts`
(the main job's default); the baseline is `moe=topk`, and step_time_vs_topk (the inverse of
tokens/s against it) is printed beside real_experts_vs_topk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_allocation import METHODS, read_records

REPO = Path(__file__).resolve().parents[1]
BASELINE = "top2"
# --grid-dir: the methods continued when --methods is not given.
GRID_METHODS = "top1,top2,straight_through_b1.8,straight_through_b2.0,topp_b2.0,remoe_b2.0"
# --main-job: the main job's MoE settings (conf/moe/*.yaml); the first is the baseline.
MAIN_JOB_METHODS: dict[str, list[str]] = {
    "topk": ["moe=topk"],
    "topk_grouped": ["moe=topk", "moe.grouped_gemm=true"],
    "anyexperts": ["moe=anyexperts"],
}
MAIN_JOB_NPROC = 2


def final_checkpoint(run_dir: Path) -> Path:
    """The newest step_* checkpoint of a finished grid run; a clear error when there is none."""
    steps = sorted((run_dir / "checkpoints").glob("step_[0-9]*"))
    steps = [s for s in steps if not s.name.endswith(".bad")]
    if not steps:
        raise SystemExit(f"error: {run_dir}/checkpoints has no checkpoint; rerun the grid with its final save "
                         "(checkpoint.save_at_end=true, the default)")
    return steps[-1]


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


def timed_run(method: str, checkpoint: Path | None, steps: int, log_interval: int, scratch: Path) -> dict:
    """One run of `steps` training steps: continuing a grid checkpoint, or (checkpoint None) the
    main job from its first step, under torchrun with MAIN_JOB_NPROC processes."""
    start = checkpoint_step(checkpoint) if checkpoint is not None else 0
    run_dir = scratch / f"{method}_{start}"
    settings = [f"trainer.max_steps={start + steps}", f"trainer.eval_interval={10 * (start + steps)}",
                "trainer.pictures_at_end=false", f"logging.log_interval={log_interval}", "logging.console=false",
                "logging.tensorboard=false", f"experiment.run_dir={run_dir}", "checkpoint.interval=0",
                "checkpoint.save_at_end=false"]
    env = None
    if checkpoint is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc-per-node={MAIN_JOB_NPROC}", "-m", "launcher.train", "experiment=shakespeare_cpu",
                   *MAIN_JOB_METHODS[method], *settings]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    else:
        command = [sys.executable, "-m", "launcher.train", "experiment=shakespeare_cpu",
                   "parallel.expert_model_parallel_size=1", *METHODS[method], *settings,
                   f"checkpoint.resume={checkpoint}", "checkpoint.load_optimizer=true"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: {method} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return summarise_windows(read_records(run_dir), start=start, method=method)


def summarise_windows(records: list[dict], *, start: int, method: str) -> dict:
    """Mean tokens_per_s and real experts per token (all layers) of the logged windows after
    `start`, the first one left out: it holds the resume and the warm-up."""
    timed = [r for r in records if "tokens_per_s" in r and r.get("step", 0) > start][1:]
    if not timed:
        raise SystemExit(f"error: {method}: no timed window after the first; raise --steps")
    real = [v for r in timed for k, v in r.items() if k.startswith("moe/real_experts_per_token/layer")]
    if not real:
        raise SystemExit(f"error: {method}: its metrics have no moe/real_experts_per_token/layer<i>")
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed),
            "real_experts_per_token": statistics.mean(real)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-dir", type=Path, help="a tools/bench_allocation.py --out-dir")
    parser.add_argument("--main-job", action="store_true",
                        help=f"the main job from scratch, {MAIN_JOB_NPROC} processes: {', '.join(MAIN_JOB_METHODS)}")
    parser.add_argument("--methods", default=None,
                        help=f"default: {GRID_METHODS} (--main-job: all of its methods)")
    parser.add_argument("--seed", type=int, default=1, help="which grid run of each method to continue")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.main_job == (args.grid_dir is not None):
        raise SystemExit("error: give either --grid-dir (continue a grid's runs) or --main-job (from scratch)")
    known = MAIN_JOB_METHODS if args.main_job else METHODS
    baseline = next(iter(MAIN_JOB_METHODS)) if args.main_job else BASELINE
    methods = (args.methods or (",".join(MAIN_JOB_METHODS) if args.main_job else GRID_METHODS)).split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; known: {', '.join(known)}")
    if baseline not in methods:
        raise SystemExit(f"error: --methods must include {baseline}, the baseline of the ratios")
    checkpoints = {m: None if args.main_job else final_checkpoint(args.grid_dir / f"{m}_s{args.seed}")
                   for m in methods}
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as scratch:
        for round_index in range(args.rounds):
            order = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
            for method in order:
                sample = timed_run(method, checkpoints[method], args.steps, args.log_interval,
                                   Path(scratch) / f"round{round_index}")
                samples[method].append(sample)
                print(f"round {round_index + 1}/{args.rounds} {method}: {sample['tokens_per_s']:.0f} tok/s, "
                      f"{sample['real_experts_per_token']:.3f} real experts per token", flush=True)
    rows = []
    for method in methods:
        tok_s = statistics.median(s["tokens_per_s"] for s in samples[method])
        real = statistics.mean(s["real_experts_per_token"] for s in samples[method])
        rows.append({"method": method, "tokens_per_s": tok_s, "tokens_per_s_all": [s["tokens_per_s"]
                                                                                   for s in samples[method]],
                     "real_experts_per_token": real})
    base = next(r for r in rows if r["method"] == baseline)
    for row in rows:
        row[f"tokens_per_s_vs_{baseline}"] = row["tokens_per_s"] / base["tokens_per_s"]
        row[f"real_experts_vs_{baseline}"] = row["real_experts_per_token"] / base["real_experts_per_token"]
        if args.main_job:
            row[f"step_time_vs_{baseline}"] = base["tokens_per_s"] / row["tokens_per_s"]
    extra = [f"step_time_vs_{baseline}"] if args.main_job else []
    names = [f"tokens_per_s_vs_{baseline}", *extra, f"real_experts_vs_{baseline}"]
    print(f"{'method':24s} {'tok/s':>8s} {'spread':>15s} {'real/tok':>9s} " + " ".join(f"{n:>22s}" for n in names))
    for row in rows:
        spread = f"[{min(row['tokens_per_s_all']):.0f}, {max(row['tokens_per_s_all']):.0f}]"
        print(f"{row['method']:24s} {row['tokens_per_s']:8.0f} {spread:>15s} {row['real_experts_per_token']:9.3f} "
              + " ".join(f"{row[n]:22.3f}" for n in names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"grid_dir": str(args.grid_dir),
                                                                  "json": str(args.json)},
                                         "overrides": {m: known[m] for m in methods},
                                         "checkpoints": {m: str(c) for m, c in checkpoints.items()},
                                         "methods": rows}, indent=2))


if __name__ == "__main__":
    main()
