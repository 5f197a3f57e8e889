"""PNG pictures of a run: loss curves, expert load, and where the router spends its experts.

    from anyexperts.training.pictures import draw_run_pictures
    written, skipped = draw_run_pictures([run_dir], run_dir / "pictures")

From metrics.jsonl (one or more runs):
    loss_curves.png          training loss (lines) and validation loss (dots) of every run
    tokens_per_expert.png    per layer, a heatmap over logged steps of each expert's tokens
                             divided by the mean over experts (1 = even load)
From the run's last routing trace (routing_traces/step_*_rank0.npz; needs "tokens" for the
last two, which the trainer's traces carry):
    k_histogram.png          per layer, the share of validation tokens at each K
    text_allocation.png      the first characters of the first validation sequence, each
                             character's background coloured by its K, and by its importance w
                             where the router has one, one panel per layer
    real_experts_by_class.png  real experts per token (not dropped) by byte-tokenizer class
    digit_allocation.png     data=digits only: importance w and K over the 8x8 grid of the
                             validation digits of the trace (digit_pictures.py)

matplotlib (Agg backend, no display) is imported only when something is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from anyexperts.moe.trace import load_trace
from anyexperts.moe.trace_summary import CLASS_NAMES, summarise

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI)
    _pyplot().close(fig)
    return png


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass run directories written by launcher.train")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_trace(run_dir: Path) -> Optional[Path]:
    """Rank 0's trace of the last traced step, or None."""
    traces = sorted((Path(run_dir) / "routing_traces").glob("step_*_rank0.npz"))
    return traces[-1] if traces else None


def _layer_series(records: list[dict], name: str) -> dict[int, tuple[list[int], list]]:
    """{layer: (steps, values)} of the records that carry moe/<name>/layer<i>."""
    prefix = f"moe/{name}/layer"
    series: dict[int, tuple[list[int], list]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix):
                steps, values = series.setdefault(int(key[len(prefix):]), ([], []))
                steps.append(record["step"])
                values.append(value)
    return dict(sorted(series.items()))


def draw_loss_curves(runs: dict[str, list[dict]], png: Path) -> Path:
    """Left the whole runs, right their last two thirds, where the runs' differences are
    too small to read at the scale of the first steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = []
    for index, (name, records) in enumerate(runs.items()):
        train = [(r["step"], float(r["loss"])) for r in records if "loss" in r]
        val = [(r["step"], float(r["val_loss"])) for r in records if "val_loss" in r]
        curves.append((name, f"C{index % 10}", train, val))
    last_step = max((step for _, _, train, val in curves for step, _ in train + val), default=1)
    zoom_from = last_step / 3
    for ax in axes:
        for name, color, train, val in curves:
            if train:
                ax.plot(*zip(*train), color=color, lw=1.2, label=f"{name} train")
            if val:
                ax.plot(*zip(*val), color=color, ls="--", marker="o", ms=4,
                        label=f"{name} validation (last {val[-1][1]:.3f})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    zoomed = [loss for _, _, train, val in curves for step, loss in train + val
              if step >= zoom_from and math.isfinite(loss)]
    if zoomed:
        margin = 0.05 * (max(zoomed) - min(zoomed)) + 1e-3
        axes[1].set_xlim(zoom_from, last_step * 1.02)
        axes[1].set_ylim(min(zoomed) - margin, max(zoomed) + margin)
    axes[0].set_ylabel("loss (nats per token)")
    axes[0].set_title("loss curves")
    axes[1].set_title(f"from step {zoom_from:.0f}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, png)


def draw_tokens_per_expert(records: list[dict], png: Path, title: str = "") -> Path:
    series = _layer_series(records, "tokens_per_expert")
    if not series:
        raise ValueError("no moe/tokens_per_expert/layer<i> in the metrics")
    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 1.2 + 1.6 * len(series)), squeeze=False, sharex=True)
    relative = {layer: torch.tensor(values, dtype=torch.float64) for layer, (_, values) in series.items()}
    for layer, load in relative.items():
        relative[layer] = load / load.mean(dim=1, keepdim=True).clamp(min=1e-12)
    vmax = max(2.0, max(load.max().item() for load in relative.values()))
    for ax, (layer, (steps, _)) in zip(axes[:, 0], series.items()):
        load = relative[layer]
        # Columns are logged steps, which need not be evenly spaced: label them, do not scale.
        image = ax.imshow(load.T.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax,
                          interpolation="nearest", origin="lower")
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(load.shape[1]))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"layer {layer}: max/mean at step {steps[-1]} = {load[-1].max().item():.2f}", fontsize=9)
        ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[i]) for i in ticks])
    axes[-1, 0].set_xlabel("logged step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="tokens / mean over experts")
    fig.suptitle(f"tokens per expert{': ' + title if title else ''}")
    return _save(fig, png)


def _first_sequence(record: dict, key: str) -> torch.Tensor:
    """record[key] of the first sequence of the batch: traces hold tokens in [sequence, batch] order."""
    values = torch.as_tensor(record[key]).reshape(-1)
    seq_length = int(record.get("seq_length", values.numel()))
    return values.reshape(seq_length, -1)[:, 0]


def _printable(token: int) -> str:
    if token == ord("\n"):
        return "¶"
    if token == 256:
        return "§"  # end of document
    if 32 <= token < 127:
        return chr(token)
    return "·"


def draw_text_allocation(trace: list[dict], png: Path, *, max_chars: int = 256, columns: int = 64) -> Path:
    """The first max_chars characters of the trace's first sequence in rows of `columns`,
    coloured by K (and by importance where the records have it), one panel per layer."""
    if not trace or "tokens" not in trace[0]:
        raise ValueError("the trace has no tokens (trainer traces have them)")
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm

    tokens = _first_sequence(trace[0], "tokens")[:max_chars].tolist()
    rows = math.ceil(len(tokens) / columns)
    panels = []
    k_max = max(int(r["expert_ids"].shape[1]) for r in trace)
    for record in trace:
        panels.append((record, "k"))
        if "importance" in record:
            panels.append((record, "importance"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(columns * 0.2 + 1.8, len(panels) * (rows * 0.26 + 0.45)),
                             squeeze=False)
    k_cmap = plt.get_cmap("YlOrRd", k_max + 1)
    k_norm = BoundaryNorm([k - 0.5 for k in range(k_max + 2)], k_cmap.N)
    w_cmap = plt.get_cmap("PuBu")
    for ax, (record, key) in zip(axes[:, 0], panels):
        values = _first_sequence(record, key)[:len(tokens)].float()
        grid = torch.full((rows * columns,), float("nan"))
        grid[:len(tokens)] = values
        grid = grid.reshape(rows, columns).numpy()
        cmap, norm = (k_cmap, k_norm) if key == "k" else (w_cmap, None)
        image = ax.imshow(grid, cmap=cmap, norm=norm, vmin=None if norm else 0.0, vmax=None if norm else 1.0,
                          aspect="auto", interpolation="nearest")
        rgba = image.to_rgba(grid)
        for i, token in enumerate(tokens):
            r, c = divmod(i, columns)
            luminance = 0.299 * rgba[r, c, 0] + 0.587 * rgba[r, c, 1] + 0.114 * rgba[r, c, 2]
            ax.text(c, r, _printable(token), ha="center", va="center", family="DejaVu Sans Mono", fontsize=9,
                    color="white" if luminance < 0.45 else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        name = "K" if key == "k" else "importance w"
        ax.set_title(f"layer {int(record['layer_number'])}: {name} (mean over these {len(tokens)} "
                     f"characters {values.mean().item():.2f})", fontsize=9, loc="left")
        bar = fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
        if key == "k":
            bar.set_ticks(range(k_max + 1))
        bar.ax.tick_params(labelsize=7)
    fig.suptitle("allocation over the text of a validation sequence (¶ newline)", fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def draw_k_histogram(trace: list[dict], png: Path) -> Path:
    if not trace:
        raise ValueError("the trace holds no layer records")
    plt = _pyplot()
    rows = summarise(trace)
    k_max = max(len(row["k_histogram"]) for row in rows) - 1
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 0.6, 3.0), squeeze=False, sharey=True)
    for ax, row in zip(axes[0], rows):
        counts = torch.tensor(row["k_histogram"] + [0] * (k_max + 1 - len(row["k_histogram"])), dtype=torch.float64)
        share = (counts / counts.sum()).tolist()
        bars = ax.bar(range(k_max + 1), share, color="C1")
        for bar, value in zip(bars, share):
            if value > 0:
                ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(k_max + 1))
        ax.set_xlabel("K")
        ax.set_title(f"layer {row['layer']}: mean K {row['mean_k']:.2f}", fontsize=9)
    axes[0, 0].set_ylabel("share of tokens")
    fig.suptitle(f"K per token, {rows[0]['tokens']} validation tokens", fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def draw_real_experts_by_class(trace: list[dict], png: Path) -> Path:
    rows = [row for row in summarise(trace) if "real_by_token_class" in row]
    if not rows:
        raise ValueError("the trace has no tokens (trainer traces have them)")
    plt = _pyplot()
    names = [name for name in CLASS_NAMES if any(name in row["tokens_by_class"] for row in rows)]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 3.8))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        values = [row["real_by_token_class"].get(name, float("nan")) for name in names]
        ax.bar([i + (index - (len(rows) - 1) / 2) * width for i in range(len(names))], values, width,
               label=f"layer {row['layer']} (all {row['real_per_token']:.2f})")
    counts = rows[0]["tokens_by_class"]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{name}\n{counts.get(name, 0)} tokens" for name in names], fontsize=8)
    ax.set_ylabel("real experts per token")
    ax.set_title("real experts per token by token class (validation batch)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, png)


def draw_run_pictures(run_dirs: Sequence[Path], out_dir: Path,
                      trace_paths: Optional[Sequence[Optional[Path]]] = None) -> tuple[list[Path], list[str]]:
    """All pictures of the given runs into out_dir: loss curves compare the runs, the others
    are per run (file names prefixed by the run's directory name when there are several).
    trace_paths, one per run, override each run's latest trace. Returns (written, skipped),
    skipped as 'picture: reason' lines for what the runs lack."""
    out_dir = Path(out_dir)
    run_dirs = [Path(run) for run in run_dirs]
    trace_paths = list(trace_paths) if trace_paths is not None else [None] * len(run_dirs)
    written: list[Path] = []
    skipped: list[str] = []
    metrics = {run.name: read_metrics(run) for run in run_dirs}
    written.append(draw_loss_curves(metrics, out_dir / "loss_curves.png"))
    for run, trace_path in zip(run_dirs, trace_paths):
        prefix = f"{run.name}_" if len(run_dirs) > 1 else ""
        try:
            written.append(draw_tokens_per_expert(metrics[run.name], out_dir / f"{prefix}tokens_per_expert.png",
                                                  title=run.name))
        except ValueError as err:
            skipped.append(f"{prefix}tokens_per_expert.png: {err}")
        written_from_trace, skipped_from_trace = draw_trace_pictures(trace_path or latest_trace(run), out_dir, prefix)
        written += written_from_trace
        skipped += skipped_from_trace
    return written, skipped


def draw_trace_pictures(trace_path: Optional[Path], out_dir: Path, prefix: str = "") -> tuple[list[Path], list[str]]:
    names = ("k_histogram.png", "text_allocation.png", "real_experts_by_class.png")
    if trace_path is None:
        return [], [f"{prefix}{name}: no routing trace (trainer.routing_trace_at_end=true writes one)" for name in names]
    trace = load_trace(trace_path)
    if not trace:
        return [], [f"{prefix}{name}: {trace_path} holds no layer records (megatron's moe=topk layer is not traced)"
                    for name in names]
    written, skipped = [], []
    draws = [draw_k_histogram, draw_text_allocation, draw_real_experts_by_class]
    from anyexperts.training.digit_pictures import draw_digit_allocation, is_digits_trace

    if is_digits_trace(trace):
        names, draws = (*names, "digit_allocation.png"), [*draws, draw_digit_allocation]
    for name, draw in zip(names, draws):
        try:
            written.append(draw(trace, Path(out_dir) / f"{prefix}{name}"))
        except ValueError as err:
            skipped.append(f"{prefix}{name}: {err}")
    return written, skipped


def _print_flushed(message: str) -> None:
    print(message, flush=True)


def draw_pictures_at_end(run_dir: Path, info: Callable[[str], None] = _print_flushed) -> list[Path]:
    """The trainer's end-of-run pictures into <run_dir>/pictures/, paths printed through info.
    Drawing is a by-product of training: any failure is printed and swallowed."""
    try:
        written, skipped = draw_run_pictures([run_dir], Path(run_dir) / "pictures")
    except Exception as err:  # noqa: BLE001
        info(f"pictures not drawn: {type(err).__name__}: {err}")
        return []
    for path in written:
        info(f"picture: {path}")
    for line in skipped:
        info(f"picture skipped: {line}")
    return written
