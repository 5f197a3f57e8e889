"""Image and text tokens: AnyExperts against megatron top-k at equal real experts per token
on data=digits, method x seed training runs on CPU, one table row per method (printed, and
as JSON with --json).

    python tools/bench_digits.py --dry-run                             # the grid's commands
    python tools/bench_digits.py --seeds 0,1,2 --steps 300 --json runs/bench_digits.json
    python tools/bench_digits.py --methods top2,anyexperts_b2.0 --seeds 0 --steps 100   # a pilot

Each run is one process (launcher.train, experiment=digits_cpu, expert-parallel size 1,
OMP_NUM_THREADS=1) writing <out-dir>/<method>_s<seed>/; a finished run (a validation record
at the last step) is kept when the command is run again. Per method, over seeds (mean ± std):
caption_accuracy, caption_loss and val_loss at the last step; real experts per token over all
tokens, on image and on text tokens (training statistics of the last logged step, mean over
layers; megatron's top-k computes exactly k for every token, so its split is k by
construction); and from the final routing trace (one validation micro-batch) real experts per
token on background pixels (grey level 0), ink pixels and text. The question it answers:
fewer real experts on image than on text tokens, fewest on background pixels, at no loss of
caption accuracy?
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench_allocation import launch_run, log_tail, read_records, shell_line, spread
from compare_runs import _layer_values

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Equal real experts per token: top-2 against AnyExperts (K in [1, 3]) held at 2.0 overall, and
# with 2.0 split by modality (image tokens are ~89% of the stream: 0.89 * 1.9 + 0.11 * 2.8 = 2.0).
METHODS = {
    "top2": ["moe=topk", "moe.router_topk=2"],
    "anyexperts_b2.0": ["moe=anyexperts", "moe.anyexperts.budget_target=2.0"],
    "anyexperts_img1.9_txt2.8": ["moe=anyexperts", "moe.anyexperts.budget_target=2.0",
                                 "moe.anyexperts.budget_bias_rate=0",
                                 "moe.anyexperts.budget_target_by_modality={image: 1.9, text: 2.8}"],
}
MODALITIES = ("image", "text")
TRACE_GROUPS = ("background_pixels", "ink_pixels", "text")


def train_command(method: str, seed: int, run_dir: Path, steps: int, eval_interval: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "experiment=digits_cpu", "parallel.expert_model_parallel_size=1",
            f"trainer.max_steps={steps}", f"trainer.seed={seed}", f"trainer.eval_interval={eval_interval}",
            "trainer.pictures_at_end=false", "checkpoint.save_at_end=false", "checkpoint.interval=0",
            f"experiment.run_dir={run_dir}", *METHODS[method], *extra]


def _final(records: list[dict], steps: int) -> dict | None:
    return next((r for r in reversed(records) if r.get("step") == steps and "val_loss" in r), None)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def extract_run(run_dir: Path, steps: int, topk: int | None) -> dict:
    records = read_records(run_dir)
    final = _final(records, steps)
    if final is None:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no validation record at step {steps}")
    row = {name: final.get(name) for name in ("val_loss", "caption_accuracy", "caption_loss", "caption_digit_loss")}
    row["real_experts_per_token"] = _mean(_layer_values(final, "real_experts_per_token"))
    for modality in MODALITIES:
        value = _mean(_layer_values(final, f"real_experts_per_token/{modality}"))
        row[f"real_{modality}"] = float(topk) if value is None and topk is not None else value
        row[f"val_real_{modality}"] = _mean(_layer_values(final, f"val_real_experts_per_token/{modality}"))
    from anyexperts.moe.trace import load_trace
    from anyexperts.training.digit_pictures import pixel_allocation_summary

    traces = sorted((run_dir / "routing_traces").glob("*_rank0.npz"))
    trace = load_trace(traces[-1]) if traces else []
    if trace:
        summary = pixel_allocation_summary(trace)
        for group in TRACE_GROUPS:
            row[f"trace_real_{group}"] = _mean([r[group] for r in summary if r[group] is not None])
    elif topk is not None:  # megatron's layer is not traced; it computes k for every token
        for group in TRACE_GROUPS:
            row[f"trace_real_{group}"] = float(topk)
    return row


def aggregate(method: str, runs: list[dict]) -> dict:
    keys = sorted({key for run in runs for key in run if key != "seed"})
    return {"method": method, "overrides": METHODS[method], "seeds": [run["seed"] for run in runs],
            **{key: spread([run[key] for run in runs if run.get(key) is not None]) for key in keys}}


def _pm(stats: dict, spec: str = ".3f") -> str:
    if not stats or stats["mean"] is None:
        return "-"
    return f"{stats['mean']:{spec}}" + (f" ± {stats['std']:{spec}}" if stats["std"] is not None else "")


COLUMNS = (("caption_accuracy", "caption acc"), ("caption_loss", "caption loss"), ("val_loss", "val_loss"),
           ("real_experts_per_token", "real/tok"), ("real_image", "real image"), ("real_text", "real text"),
           ("trace_real_background_pixels", "real bg px"), ("trace_real_ink_pixels", "real ink px"),
           ("trace_real_text", "real text (trace)"))


def print_table(rows: list[dict]) -> None:
    header = ["method", "n"] + [title for _, title in COLUMNS]
    lines = [header] + [[row["method"], str(len(row["seeds"]))] + [_pm(row.get(key, {})) for key, _ in COLUMNS]
                        for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=None, help="default: steps // 2")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench_digits")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--extra", action="append", default=[], help="a Hydra override for every run")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    eval_interval = args.eval_interval or max(args.steps // 2, 1)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    failed = []
    for method in methods:
        topk = 2 if method == "top2" else None
        for seed in seeds:
            run_dir = args.out_dir / f"{method}_s{seed}"
            command = train_command(method, seed, run_dir, args.steps, eval_interval, args.extra)
            if args.dry_run:
                print(shell_line(command))
                continue
            if _final(read_records(run_dir), args.steps) is None:
                log_path = run_dir.with_name(run_dir.name + ".log")
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                print(f"running {method} seed {seed} -> {run_dir}", flush=True)
                if launch_run(command, log_path) != 0:
                    failed.append(f"{method} seed {seed}:\n  " + "\n  ".join(log_tail(log_path)))
                    continue
            results[method].append({"seed": seed, **extract_run(run_dir, args.steps, topk)})
    if args.dry_run:
        return 0
    rows = [aggregate(method, runs) for method, runs in results.items() if runs]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": seeds, "extra": args.extra,
                                         "methods": rows, "runs": results}, indent=2))
        print(f"wrote {args.json}")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
