"""Where the experts go over an image: importance w and K per pixel of validation digits
(data=digits), from a routing trace whose records carry the tokens (trainer traces do).

    from anyexperts.training.digit_pictures import draw_digit_allocation, is_digits_trace
    if is_digits_trace(trace):
        draw_digit_allocation(trace, run_dir / "pictures" / "digit_allocation.png")

digit_allocation.png: one column per complete validation image of the trace (up to
`max_images`), titled with its caption's digit; the first row shows the pixels, then per
layer a row of importance w (where the router has one) and a row of K, each over the 8x8
grid. `pixel_allocation_summary` gives the numbers behind it: mean real experts per token on
background pixels (grey level 0), ink pixels and caption tokens, per layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from anyexperts.data import digits


def _batch_major(record: dict, key: str) -> torch.Tensor:
    """record[key] as [B, S]: traces hold rows in the layers' [sequence, batch] order."""
    values = torch.as_tensor(record[key])
    seq_length = int(record.get("seq_length", values.shape[0]))
    return values.reshape(seq_length, -1, *values.shape[1:]).transpose(0, 1)


def is_digits_trace(trace: list[dict]) -> bool:
    return bool(trace) and "tokens" in trace[0] and bool((torch.as_tensor(trace[0]["tokens"]) == digits.BEGIN_IMAGE).any())


def complete_images(tokens_BS: torch.Tensor) -> list[tuple[int, int]]:
    """(b, s) of every <boi> whose 64 pixels and <eoi> lie in the same sample."""
    found = []
    seq = tokens_BS.shape[1]
    for b, s in (tokens_BS == digits.BEGIN_IMAGE).nonzero().tolist():
        if s + digits.NUM_PIXELS + 1 < seq and tokens_BS[b, s + digits.NUM_PIXELS + 1] == digits.END_IMAGE:
            found.append((b, s))
    return found


def _caption_digit(tokens_BS: torch.Tensor, b: int, s: int) -> str:
    digit_at = s + digits.NUM_PIXELS + 2 + len(digits.CAPTION_PREFIX)
    if digit_at < tokens_BS.shape[1]:
        return chr(int(tokens_BS[b, digit_at]))
    return "?"


def _real_experts(record: dict) -> torch.Tensor:
    entry = torch.as_tensor(record["expert_ids"])
    real = (entry >= 0) & (entry < int(record["num_experts"])) & ~torch.as_tensor(record["dropped_mask"])
    return real.sum(-1)


def pixel_allocation_summary(trace: list[dict]) -> list[dict]:
    """Per layer: mean real experts per token on background pixels, ink pixels, markers and text."""
    tokens_T = torch.as_tensor(trace[0]["tokens"]).reshape(-1)
    is_pixel = (tokens_T >= digits.PIXEL_BASE) & (tokens_T < digits.BEGIN_IMAGE)
    groups = {"background_pixels": tokens_T == digits.PIXEL_BASE, "ink_pixels": is_pixel & (tokens_T > digits.PIXEL_BASE),
              "image_markers": tokens_T >= digits.BEGIN_IMAGE, "text": tokens_T < digits.PIXEL_BASE}
    rows = []
    for record in trace:
        real_T = _real_experts(record).double()
        row = {"layer": int(record["layer_number"])}
        for name, mask in groups.items():
            row[name] = float(real_T[mask].mean()) if mask.any() else None
        rows.append(row)
    return rows


def draw_digit_allocation(trace: list[dict], png: Path, *, max_images: int = 8) -> Path:
    from anyexperts.training.pictures import _pyplot, _save

    if not is_digits_trace(trace):
        raise ValueError("the trace holds no digit images (a data=digits run's traces do)")
    tokens_BS = _batch_major(trace[0], "tokens")
    images = complete_images(tokens_BS)[:max_images]
    if not images:
        raise ValueError("no complete 8x8 image in the traced batch (sequences shorter than 66 tokens?)")
    panels = [("pixels", None)]
    for record in trace:
        if "importance" in record:
            panels.append(("importance", record))
        panels.append(("k", record))
    plt = _pyplot()
    k_max = max(int(torch.as_tensor(r["expert_ids"]).shape[1]) for r in trace)
    fig, axes = plt.subplots(len(panels), len(images), figsize=(1.25 * len(images) + 1.6, 1.3 * len(panels) + 0.6),
                             squeeze=False)
    side = digits.IMAGE_SIDE
    for row, (kind, record) in enumerate(panels):
        values_BS = tokens_BS if kind == "pixels" else _batch_major(record, kind)
        for col, (b, s) in enumerate(images):
            ax = axes[row, col]
            grid = values_BS[b, s + 1:s + 1 + digits.NUM_PIXELS].reshape(side, side).float().numpy()
            if kind == "pixels":
                shown = ax.imshow(grid - digits.PIXEL_BASE, cmap="gray_r", vmin=0, vmax=digits.NUM_GREY_LEVELS - 1)
                ax.set_title(f"digit {_caption_digit(tokens_BS, b, s)}", fontsize=8)
            elif kind == "importance":
                shown = ax.imshow(grid, cmap="PuBu", vmin=0.0, vmax=1.0)
            else:
                shown = ax.imshow(grid, cmap="YlOrRd", vmin=0, vmax=k_max)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                label = "pixels" if kind == "pixels" else \
                    f"layer {int(record['layer_number'])}\n{'w' if kind == 'importance' else 'K'}"
                ax.set_ylabel(label, fontsize=8)
        fig.colorbar(shown, ax=list(axes[row]), fraction=0.015, pad=0.01).ax.tick_params(labelsize=6)
    summary = pixel_allocation_summary(trace)
    means = ", ".join(f"L{r['layer']} {r['background_pixels']:.2f}/{r['ink_pixels']:.2f}/{r['text']:.2f}"
                      for r in summary if r["background_pixels"] is not None and r["ink_pixels"] is not None
                      and r["text"] is not None)
    fig.suptitle(f"importance w and K over validation digits; real experts per token background/ink/text: {means}",
                 fontsize=8)
    return _save(fig, png)
