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

Layers record only when training with gradients enabled (and `record_training` is on: the
trainer turns it off for the steps it does not log, so statistics cost nothing there), or
when `set_enabled(True)` (e.g. for evaluation); `with separate_sink():` records into a fresh
sink for the block (the trainer keeps validation statistics apart from the training
interval's that way). collect() also
derives, per layer, from the interval's and group's sums:
- `load_imbalance_global`: max / mean of the collected tokens_per_expert (beside the
  per-forward, per-rank `load_imbalance`);
- `k_std` (std over tokens of K), `k_off_mode_frac` (share of tokens whose K differs from
  the most common K) and `k_position_corr` (Pearson correlation of K with the position in
  the sequence), exact over every token of the interval, from `k_slot_moments` (sums of
  1, K, K^2, s, s^2, K s: record_slot_moments), which collect() drops from its result.

Names the AnyExperts layer records (layer.py): real_experts_per_token (slots computed in
that forward), real_experts_per_token_at_eval (fractional training only: what evaluation
computes for the same tokens),
virtual_experts_per_token, k_histogram (counts of K = k_min..k_max), importance_mean,
importance_std, tokens_per_expert (length E: this rank's real slots per global expert after
capacity), load_imbalance, dropped_slots, load_balance_loss, budget_loss, z_loss (when the
loss is on), a2a_bytes (bytes this rank sent to other ranks in dispatch + combine).
With rebalancing on (moe.rebalance.enable, EP > 1), from the step's global plan:
rank_load_imbalance_before / rank_load_imbalance_after (max / mean slots computed per
expert-parallel rank without / with the plan), rebalance_active (1 when the plan moved
slots), rebalanced_slots (slots computed away from their expert's home rank, all ranks),
rebalance_weight_bytes (expert weight bytes this rank sent to helpers; the gradients come
back in the same amount).

With a TokenInfo (token_info.py) around the forward, also per modality m (e.g. text, image):
real_experts_per_token/<m>, virtual_experts_per_token/<m>, slots_per_token/<m>,
importance_mean/<m> (means over that modality's tokens of the interval and group, exact:
derived from sums), modality_tokens/<m> (their count) and k_histogram/<m>. Weighted by
modality_tokens they average to the overall statistics (which are means over forwards, so
the two agree exactly when every forward holds the same number of tokens, as in training).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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
        _derive_modality_statistics(out)
        for layer, moments in out.pop("k_slot_moments", {}).items():
            for name, value in _slot_statistics(moments.double(), out.get("k_histogram", {}).get(layer)).items():
                out.setdefault(name, {})[layer] = value.float()
        return out

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


def _slot_statistics(moments: torch.Tensor, k_histogram) -> dict[str, torch.Tensor]:
    """k_std, k_position_corr (and k_off_mode_frac from the histogram) from summed moments."""
    n = moments[0].clamp(min=1)
    sum_k, sum_k2, sum_s, sum_s2, sum_ks = moments[1:]
    var_k = (sum_k2 / n - (sum_k / n) ** 2).clamp(min=0)
    var_s = (sum_s2 / n - (sum_s / n) ** 2).clamp(min=0)
    cov = sum_ks / n - (sum_k / n) * (sum_s / n)
    denom = (var_k * var_s).sqrt()
    # Constant K (or one position) has no correlation to speak of: report 0, not NaN.
    corr = torch.where(denom > 1e-12, cov / denom.clamp(min=1e-12), torch.zeros_like(cov))
    result = {"k_std": var_k.sqrt(), "k_position_corr": corr}
    if k_histogram is not None:
        k_histogram = k_histogram.double()
        result["k_off_mode_frac"] = 1.0 - k_histogram.max() / k_histogram.sum().clamp(min=1)
    return result


# Per-modality sums over tokens: [tokens, real slots, virtual slots, slots, importance].
_MODALITY_MOMENTS = "modality_moments/"


def _derive_modality_statistics(out: dict[str, dict[int, torch.Tensor]]) -> None:
    """Turns the summed `modality_moments/<m>` into token-weighted means per modality."""
    for name in [n for n in out if n.startswith(_MODALITY_MOMENTS)]:
        modality = name[len(_MODALITY_MOMENTS):]
        for layer, moments in out.pop(name).items():
            moments = moments.double()
            num_tokens = moments[0]
            # A modality absent from the interval has no mean: report nothing rather than 0.
            if num_tokens <= 0:
                continue
            derived = {"modality_tokens": num_tokens, "real_experts_per_token": moments[1] / num_tokens,
                       "virtual_experts_per_token": moments[2] / num_tokens,
                       "slots_per_token": moments[3] / num_tokens}
            if layer in out.get("importance_mean", {}):
                derived["importance_mean"] = moments[4] / num_tokens
            for stat, value in derived.items():
                out.setdefault(f"{stat}/{modality}", {})[layer] = value.float()


_SINK = StatsSink()


def record(layer_number: int, name: str, value: torch.Tensor, *, reduction: str = "mean") -> None:
    """Adds `value` (scalar or 1-D) to the running sum of (name, layer_number)."""
    _SINK.record(layer_number, name, value, reduction=reduction)


def collect(group=None) -> dict[str, dict[int, torch.Tensor]]:
    """{name: {layer_number: value}} (see the module docstring for mean vs sum)."""
    return _SINK.collect(group)


def record_slot_moments(layer_number: int, num_slots_T: torch.Tensor, position_T: torch.Tensor) -> None:
    """Sums of 1, K, K^2, s, s^2, K s over these tokens (collect derives k_std, k_position_corr)."""
    k_T, s_T = num_slots_T.double(), position_T.to(device=num_slots_T.device, dtype=torch.float64)
    moments = torch.stack([torch.ones_like(k_T), k_T, k_T * k_T, s_T, s_T * s_T, k_T * s_T]).sum(-1)
    _SINK.record(layer_number, "k_slot_moments", moments, reduction="sum")


def record_by_modality(layer_number: int, modality_T: torch.Tensor, names, *, routing, importance_T, slot_range) -> None:
    """Sums per modality (collect derives `<stat>/<modality>` means from them: token-weighted,
    so over the modalities they average back to the overall statistics) and `k_histogram/<m>`."""
    min_slots, max_slots = slot_range
    num_real_T, num_slots_T = routing.num_real_T.double(), routing.num_slots_T
    per_token_TX = torch.stack([torch.ones_like(num_real_T), num_real_T, routing.num_virtual_T.double(),
                                num_slots_T.double(),
                                importance_T.double() if importance_T is not None else torch.zeros_like(num_real_T)],
                               dim=-1)
    for index, name in enumerate(names):
        in_modality_T = (modality_T == index).to(torch.float64)
        _SINK.record(layer_number, f"{_MODALITY_MOMENTS}{name}", in_modality_T @ per_token_TX, reduction="sum")
        k_histogram = torch.zeros(max_slots - min_slots + 1, dtype=torch.float64, device=num_slots_T.device)
        k_histogram.scatter_add_(0, num_slots_T - min_slots, in_modality_T)
        _SINK.record(layer_number, f"k_histogram/{name}", k_histogram, reduction="sum")


def reset() -> None:
    _SINK.reset()


@contextlib.contextmanager
def separate_sink(*, enabled: bool = True) -> Iterator[StatsSink]:
    """Records go to a fresh sink inside the block (enabled: also outside training); the
    previous sink, with its interval so far, is back afterwards. Use sink.collect(group)."""
    global _SINK
    previous, sink = _SINK, StatsSink()
    sink.enabled = enabled
    _SINK = sink
    try:
        yield sink
    finally:
        _SINK = previous


def set_enabled(enabled: bool) -> None:
    """Record also outside training (evaluation); training records unless record_training(False)."""
    _SINK.enabled = bool(enabled)


# Whether training forwards record. The trainer turns it on only for the steps it logs, so the
# statistics cost nothing on the others (a logged value is that step's, not the interval's).
_RECORD_TRAINING = True


def record_training(enabled: bool) -> None:
    global _RECORD_TRAINING
    _RECORD_TRAINING = bool(enabled)


def is_enabled() -> bool:
    return _SINK.enabled


def should_record(training: bool) -> bool:
    return (training and torch.is_grad_enabled() and _RECORD_TRAINING) or _SINK.enabled
