"""Per-layer routing statistics: AnyExperts layers record, the trainer collects.

    from anyexperts.moe import stats
    stats.reset()                                  # start of a logging interval
    ...forward/backward steps...                   # layers call stats.record(...) while training
    per_layer = stats.collect(group=dp_group)      # {name: {layer_number: tensor}}
    per_layer["real_experts_per_token"][1]         # e.g. tensor(3.61)

record(layer_number, name, value) keeps, per (name, layer), a running sum of the value
(a scalar or a 1-D tensor, detached, kept where it is: no host sync) and a count of calls.
collect() returns, per name and layer:
- mean over the recorded calls (default), averaged over `group`'s ranks when given;
- for names recorded with reduction="sum" (the layer uses it for k_histogram and
  dropped_slots): the plain sum over calls, summed over `group`'s ranks - counts add up.
Every rank of `group` must have recorded the same names and layers (true for the
data-parallel group of one pipeline stage); collect packs everything into one all-reduce.
collect() leaves the sink as it is; call reset() to start a new interval.

Layers record only when training with gradients enabled, or when `set_enabled(True)` (e.g.
for evaluation). collect() also derives `load_imbalance_global` per layer: max / mean of
the collected tokens_per_expert (the interval's and group's mean load), beside the
per-forward, per-rank `load_imbalance`.

Names the AnyExperts layer records (layer.py): real_experts_per_token,
virtual_experts_per_token, k_histogram (counts of K = k_min..k_max), importance_mean,
importance_std, tokens_per_expert (length E: this rank's real slots per global expert after
capacity), load_imbalance, dropped_slots, load_balance_loss, budget_loss, z_loss (when the
loss is on), a2a_bytes (bytes this rank sent to other ranks in dispatch + combine).
"""

from __future__ import annotations


import torch
import torch.distributed as dist


class StatsSink:
    def __init__(self) -> None:
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._summed_names: set[str] = set()
        self.enabled = False

    def record(self, layer_number: int, name: str, value: torch.Tensor, *, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
        if reduction == "sum":
            self._summed_names.add(name)
        key = (name, int(layer_number))
        value = value.detach()
        if value.dim() > 1:
            raise ValueError(f"stats value for {name!r} must be a scalar or 1-D, got shape {tuple(value.shape)}")
        if key in self._sums:
            if value.shape != self._sums[key].shape:
                raise ValueError(f"stats {name!r} of layer {layer_number}: shape {tuple(value.shape)} after "
                                 f"{tuple(self._sums[key].shape)} (two layers with one layer_number?)")
            self._sums[key] = self._sums[key] + value.to(self._sums[key].dtype)
            self._counts[key] += 1
        else:
            self._sums[key] = value.double().clone()
            self._counts[key] = 1

    def collect(self, group=None) -> dict[str, dict[int, torch.Tensor]]:
        keys = sorted(self._sums)
        values = []
        for key in keys:
            # Reduced where the sums live: NCCL cannot all-reduce host tensors.
            total = self._sums[key]
            values.append(total if key[0] in self._summed_names else total / self._counts[key])
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1 and keys:
            flat = torch.cat([v.reshape(-1) for v in values])
            dist.all_reduce(flat, group=group)
            world = dist.get_world_size(group)
            reduced, offset = [], 0
            for key, value in zip(keys, values):
                part = flat[offset:offset + value.numel()].view_as(value)
                offset += value.numel()
                reduced.append(part if key[0] in self._summed_names else part / world)
            values = reduced
        out: dict[str, dict[int, torch.Tensor]] = {}
        for (name, layer), value in zip(keys, values):
            out.setdefault(name, {})[layer] = value.float().cpu()
        for layer, loads in out.get("tokens_per_expert", {}).items():
            out.setdefault("load_imbalance_global", {})[layer] = loads.max() / loads.mean().clamp(min=1e-12)
        return out

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


_SINK = StatsSink()


def record(layer_number: int, name: str, value: torch.Tensor, *, reduction: str = "mean") -> None:
    """Adds `value` (scalar or 1-D) to the running sum of (name, layer_number)."""
    _SINK.record(layer_number, name, value, reduction=reduction)


def collect(group=None) -> dict[str, dict[int, torch.Tensor]]:
    """{name: {layer_number: value}} (see the module docstring for mean vs sum)."""
    return _SINK.collect(group)


def reset() -> None:
    _SINK.reset()


def set_enabled(enabled: bool) -> None:
    """Record also outside training (evaluation); training always records."""
    _SINK.enabled = bool(enabled)


def is_enabled() -> bool:
    return _SINK.enabled


def should_record(training: bool) -> bool:
    return (training and torch.is_grad_enabled()) or _SINK.enabled
