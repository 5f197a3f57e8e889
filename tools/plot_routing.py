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
column per class that occurs, with a footer line of token counts per class:
    space        byte 32 and tab
    newline      10 and 13
    punctuation  ASCII punctuation (string.punctuation)
    word_start   an ASCII letter at position 0 or after a non-letter of the same sequence
    word_inner   an ASCII letter after a letter of the same sequence
    other        digits, non-ASCII bytes, end-of-document and anything else
summarise() puts these in each row as "real_by_token_class", "k_by_token_class" (mean K) and
"tokens_by_class" (only classes with at least one token); token_classes() and CLASS_NAMES
assign the classes and can be reused. With another tokenizer the classes mean nothing.
Records without "tokens" get neither the keys nor the second table.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import torch

from anyexperts.moe.trace import load_trace


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return (a @ b).item() / denom if denom > 0 else float("nan")


CLASS_NAMES = ("space", "newline", "punctuation", "word_start", "word_inner", "other")
SPACE, NEWLINE, PUNCTUATION, WORD_START, WORD_INNER, OTHER = range(len(CLASS_NAMES))
_PUNCTUATION_BYTES = torch.tensor([ord(c) for c in string.punctuation], dtype=torch.long)


def token_classes(tokens_SB: torch.Tensor) -> torch.Tensor:
    """Byte-tokenizer class ids (indices into CLASS_NAMES) of tokens [S, B], sequence
    axis first (a 1-D tensor is one sequence); returns int64 of the same shape.
    Word starts and word inners look at the previous token along the sequence axis."""
    tokens = torch.as_tensor(tokens_SB).long()
    if tokens.dim() not in (1, 2):
        raise ValueError(f"token_classes wants tokens [S, B] or [S], not {tuple(tokens.shape)}")
    t = tokens if tokens.dim() == 2 else tokens.reshape(-1, 1)
    letter = ((t >= ord("A")) & (t <= ord("Z"))) | ((t >= ord("a")) & (t <= ord("z")))
    prev_letter = torch.zeros_like(letter)
    prev_letter[1:] = letter[:-1]
    classes = torch.full_like(t, OTHER)
    classes[(t == ord(" ")) | (t == ord("\t"))] = SPACE
    classes[(t == ord("\n")) | (t == ord("\r"))] = NEWLINE
    classes[torch.isin(t, _PUNCTUATION_BYTES)] = PUNCTUATION
    classes[letter & ~prev_letter] = WORD_START
    classes[letter & prev_letter] = WORD_INNER
    return classes.reshape(tokens.shape)


def _by_token_class(values: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    counts = torch.bincount(classes, minlength=len(CLASS_NAMES))
    sums = torch.bincount(classes, weights=values.double(), minlength=len(CLASS_NAMES))
    return {name: (sums[c] / counts[c]).item() for c, name in enumerate(CLASS_NAMES) if counts[c] > 0}


def summarise(trace: list[dict]) -> list[dict]:
    rows = []
    for record in trace:
        num_experts = int(record["num_experts"])
        expert_ids = record["expert_ids"]
        virtual = record["virtual_mask"].bool()
        dropped = record["dropped_mask"].bool()
        real = (expert_ids >= 0) & (expert_ids < num_experts) & ~virtual
        k = record["k"]
        # The rival routers (top-p, ReMoE) have no importance: their rows show NaN there.
        importance = record["importance"].float() if "importance" in record else torch.full((k.numel(),), float("nan"))
        real_per_token = (real & ~dropped).sum(1)
        row = {
            "layer": int(record["layer_number"]),
            "tokens": int(k.numel()),
            "mean_k": k.float().mean().item(),
            "real_per_token": real_per_token.float().mean().item(),
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
        if "tokens" in record:
            tokens = torch.as_tensor(record["tokens"]).reshape(-1)
            seq_length = int(record.get("seq_length", tokens.numel()))
            if tokens.numel() != k.numel() or seq_length <= 0 or tokens.numel() % seq_length:
                raise ValueError(f"layer {row['layer']}: {tokens.numel()} tokens do not match {k.numel()} "
                                 f"routed tokens in sequences of {seq_length}")
            classes = token_classes(tokens.reshape(seq_length, -1)).reshape(-1)
            counts = torch.bincount(classes, minlength=len(CLASS_NAMES))
            row["real_by_token_class"] = _by_token_class(real_per_token, classes)
            row["k_by_token_class"] = _by_token_class(k, classes)
            row["virtual_by_token_class"] = _by_token_class(virtual.sum(1), classes)
            row["tokens_by_class"] = {name: int(counts[c]) for c, name in enumerate(CLASS_NAMES) if counts[c] > 0}
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
