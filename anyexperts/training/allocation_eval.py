"""What the allocation learned, measured on validation batches (the trainer calls these).

- `importance_loss_spearman`: per layer, the Spearman rank correlation of each token's
  importance w (kappa ranks the same) with that token's own next-token loss, over this
  rank's validation tokens, then averaged over the data-parallel ranks (a rank statistic
  does not add up across ranks; with equal token counts the mean is a close stand-in).
  Positive: the layer gives more compute to tokens that stay hard.
- `val_loss_shuffled_allocation` (trainer.evaluate): the same batches with kappa drawn from
  another token of the same forward (allocation.shuffled_allocation): equal mean compute,
  allocation destroyed. Above val_loss means the allocation itself carries information.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_T(values_T: torch.Tensor) -> torch.Tensor:
    """0-based ranks as float64 (ties broken by position: w and losses are continuous)."""
    order_T = torch.argsort(values_T.double(), stable=True)
    ranks_T = torch.empty_like(order_T, dtype=torch.float64)
    ranks_T[order_T] = torch.arange(values_T.numel(), dtype=torch.float64, device=values_T.device)
    return ranks_T


def spearman(a_T: torch.Tensor, b_T: torch.Tensor) -> float:
    """Spearman rank correlation; 0.0 when either side is constant or has < 2 values."""
    if a_T.numel() < 2:
        return 0.0
    ra, rb = rank_T(a_T), rank_T(b_T)
    if a_T.double().std() == 0 or b_T.double().std() == 0:
        return 0.0
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


class ImportanceLossCorrelation:
    """Collects (w, own loss) per AnyExperts layer over validation forwards."""

    def __init__(self) -> None:
        self._importance: dict[int, list[torch.Tensor]] = {}
        self._loss: dict[int, list[torch.Tensor]] = {}

    def add(self, trace: list[dict], per_token_loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor) -> None:
        """trace: routing_trace() records of one forward; losses in [batch, sequence] layout."""
        # The layers see tokens in [sequence, batch] order: row s * B + b.
        loss_T = per_token_loss_BS.detach().float().t().reshape(-1).cpu()
        keep_T = loss_mask_BS.t().reshape(-1).cpu() > 0
        for record in trace:
            layer = int(record["layer_number"])
            importance_T = record["importance"].float()
            if importance_T.numel() != loss_T.numel():
                continue  # a layer that saw another token layout (sequence parallel) is left out
            self._importance.setdefault(layer, []).append(importance_T[keep_T])
            self._loss.setdefault(layer, []).append(loss_T[keep_T])

    def collect(self, group=None) -> dict[str, float]:
        """{'moe/importance_loss_spearman/layer<i>': value} averaged over `group`'s ranks."""
        layers = sorted(self._importance)
        values = torch.tensor([spearman(torch.cat(self._importance[layer]), torch.cat(self._loss[layer]))
                               for layer in layers], dtype=torch.float64)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1 and layers:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            values = values.to(device) if device is not None else values
            dist.all_reduce(values, group=group)  # NCCL needs device tensors, gloo takes host ones
            values = values.cpu() / dist.get_world_size(group)
        return {f"moe/importance_loss_spearman/layer{layer}": float(v) for layer, v in zip(layers, values)}


def validation_stat_scalars(per_layer: dict[str, dict[int, torch.Tensor]]) -> dict[str, float]:
    """stats.collect() output of validation forwards as 'moe/val_<name>/layer<i>' scalars."""
    scalars = {}
    for name, layers in per_layer.items():
        for layer, value in sorted(layers.items()):
            if value.numel() == 1:
                scalars[f"moe/val_{name}/layer{layer}"] = float(value)
    return scalars
