"""Summarises (and, with matplotlib installed, draws) a routing trace of AnyExperts layers.

    python tools/plot_routing.py runs/shakespeare_cpu/<id>/routing_traces/step_0000150_rank0.npz [--png out.png]

Traces come from `trainer.routing_trace_interval=N` (validation batches) or from
`anyexperts.moe.trace.routing_trace()` in your own code. Per layer it prints mean K, real
and virtual experts per token, dropped slots, the histogram of K, importance mean/std and
the correlation of importance with the position in the sequence (the method doc's trial
saw importance learn position); with --png it draws importance and K per token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from anyexperts.moe.trace import load_trace


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return (a @ b).item() / denom if denom > 0 else float("nan")


def summarise(trace: list[dict]) -> list[dict]:
    rows = []
    for record in trace:
        num_experts = int(record["num_experts"])
        expert_ids = record["expert_ids"]
        virtual = record["virtual_mask"].bool()
        dropped = record["dropped_mask"].bool()
        real = (expert_ids >= 0) & (expert_ids < num_experts) & ~virtual
        k = record["k"]
        importance = record["importance"].float()
        row = {
            "layer": int(record["layer_number"]),
            "tokens": int(k.numel()),
            "mean_k": k.float().mean().item(),
            "real_per_token": (real & ~dropped).sum(1).float().mean().item(),
            "virtual_per_token": virtual.sum(1).float().mean().item(),
            "dropped_per_token": dropped.sum(1).float().mean().item(),
            "importance_mean": importance.mean().item(),
            "importance_std": importance.std().item() if importance.numel() > 1 else 0.0,
            "k_histogram": torch.bincount(k.long()).tolist(),
        }
        if "seq_length" in record:
            seq_length = int(record["seq_length"])
            batch = k.numel() // seq_length
            positions = torch.arange(seq_length).repeat_interleave(batch)
            row["corr_importance_position"] = _correlation(importance, positions)
        rows.append(row)
    return rows


def _draw(trace: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(trace), 1, figsize=(10, 2.2 * len(trace)), squeeze=False)
    for ax, record in zip(axes[:, 0], trace):
        seq_length = int(record.get("seq_length", record["k"].numel()))
        batch = record["k"].numel() // seq_length
        # The first sequence of the batch: tokens are stored [sequence, batch].
        importance = record["importance"].reshape(seq_length, batch)[:, 0]
        k = record["k"].reshape(seq_length, batch)[:, 0]
        ax.plot(importance.numpy(), label="importance w")
        ax.step(range(seq_length), (k.float() / k.max().clamp(min=1)).numpy(), label="K (scaled)", where="mid")
        ax.set_title(f"layer {int(record['layer_number'])}")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--png", type=Path, help="draw importance and K per token (needs matplotlib)")
    args = parser.parse_args(argv)
    if not args.trace.exists():
        print(f"error: {args.trace} does not exist; traces are written by trainer.routing_trace_interval=N",
              file=sys.stderr)
        return 2
    trace = load_trace(args.trace)
    if not trace:
        print(f"error: {args.trace} holds no AnyExperts layer records (was moe.kind=anyexperts?)", file=sys.stderr)
        return 2
    header = f"{'layer':>5} {'tokens':>7} {'mean K':>7} {'real':>6} {'virtual':>7} {'dropped':>7} " \
             f"{'w mean':>7} {'w std':>6} {'corr(w,pos)':>11}  K histogram"
    print(header)
    for row in summarise(trace):
        print(f"{row['layer']:>5} {row['tokens']:>7} {row['mean_k']:>7.3f} {row['real_per_token']:>6.3f} "
              f"{row['virtual_per_token']:>7.3f} {row['dropped_per_token']:>7.3f} {row['importance_mean']:>7.3f} "
              f"{row['importance_std']:>6.3f} {row.get('corr_importance_position', float('nan')):>11.3f}  "
              f"{row['k_histogram']}")
    if args.png:
        try:
            _draw(trace, args.png)
        except ImportError:
            print("--png needs matplotlib (pip install matplotlib); the table above is complete", file=sys.stderr)
            return 1
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
