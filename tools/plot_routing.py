"""Summarises (and, with matplotlib installed, draws) a routing trace of AnyExperts layers.

    python tools/plot_routing.py runs/shakespeare_cpu/<id>/routing_traces/step_0000150_rank0.npz [--png out.png]

Traces come from `trainer.routing_trace_interval=N` (validation batches) or from
`anyexperts.moe.trace.routing_trace()` in your own code. Per layer it prints mean K, real
and virtual experts per token, dropped slots, the histogram of K, importance mean/std and
the correlation of importance with the position in the sequence (the method doc's trial
saw importance learn position); with --png it draws importance and K per token.

When the records carry "tokens" (the trainer's traces do: the input ids in the layer's
[sequence, batch] order, with "seq_length"), a second table follows: real experts per token
(real slots not dropped, as in the first table's "real" column) by token class of the byte
tokenizer (ids 0..255 are UTF-8 bytes, 256 is end-of-document), one row per layer and one
column per class that occurs (space, newline, punctuation, word_start, word_inner, other:
anyexperts/moe/trace_summary.py defines them, with summarise() and token_classes(), which
tools/plot_run.py draws from too), then a footer line of token counts per class. With
another tokenizer the classes mean nothing.
Records without "tokens" get neither the keys nor the second table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anyexperts.moe.trace import load_trace
from anyexperts.moe.trace_summary import (  # noqa: F401  (re-exported for callers of this tool)
    CLASS_NAMES, NEWLINE, OTHER, PUNCTUATION, SPACE, WORD_INNER, WORD_START, summarise, token_classes)


def _draw(trace: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(trace), 1, figsize=(10, 2.2 * len(trace)), squeeze=False)
    for ax, record in zip(axes[:, 0], trace):
        seq_length = int(record.get("seq_length", record["k"].numel()))
        batch = record["k"].numel() // seq_length
        # The first sequence of the batch: tokens are stored [sequence, batch].
        k = record["k"].reshape(seq_length, batch)[:, 0]
        if "importance" in record:
            ax.plot(record["importance"].reshape(seq_length, batch)[:, 0].numpy(), label="importance w")
        ax.step(range(seq_length), (k.float() / k.max().clamp(min=1)).numpy(), label="K (scaled)", where="mid")
        ax.set_title(f"layer {int(record['layer_number'])}")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png)


def _print_token_class_table(rows: list[dict]) -> None:
    """Real and virtual experts per token by token class, one line per layer; nothing without tokens."""
    rows = [row for row in rows if "real_by_token_class" in row]
    if not rows:
        return
    names = [name for name in CLASS_NAMES if any(name in row["tokens_by_class"] for row in rows)]
    widths = [max(len(name), 7) for name in names]
    for what in ("real", "virtual"):
        print()
        print(f"{what} experts per token by token class (byte tokenizer)")
        print(f"{'layer':>10} " + " ".join(f"{name:>{w}}" for name, w in zip(names, widths)))
        for row in rows:
            values = row[f"{what}_by_token_class"]
            print(f"{row['layer']:>10} " + " ".join(
                f"{values[name]:>{w}.3f}" if name in values else f"{'-':>{w}}" for name, w in zip(names, widths)))
    counts = [row["tokens_by_class"] for row in rows]
    footers = [("tokens", counts[0])] if all(c == counts[0] for c in counts) else \
        [(f"tokens@{row['layer']}", c) for row, c in zip(rows, counts)]
    for label, count in footers:
        print(f"{label:>10} " + " ".join(f"{count.get(name, 0):>{w}}" for name, w in zip(names, widths)))


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
    rows = summarise(trace)
    for row in rows:
        print(f"{row['layer']:>5} {row['tokens']:>7} {row['mean_k']:>7.3f} {row['real_per_token']:>6.3f} "
              f"{row['virtual_per_token']:>7.3f} {row['dropped_per_token']:>7.3f} {row['importance_mean']:>7.3f} "
              f"{row['importance_std']:>6.3f} {row.get('corr_importance_position', float('nan')):>11.3f}  "
              f"{row['k_histogram']}")
    _print_token_class_table(rows)
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
