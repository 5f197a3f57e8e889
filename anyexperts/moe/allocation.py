"""Step 2a of the AnyExperts layer: how many slots K_i each token gets from its importance w_i.

    allocation = allocate_slots(importance_T, position_T, ae, training=layer.training)
    allocation.num_slots_T           # int64 K_i, the slots this forward selects
    allocation.last_slot_mass_T      # weight of slot K_i - 1 in the gates (None: every slot weighs 1)
    allocation.num_slots_at_eval_T   # the K_i evaluation gives them, where it differs (else None)

kappa_i = k_min + w_i (k_max - k_min) is the continuous slot count. `k_rounding` turns it
into slots:

- straight_through (learned; the default): K = floor(kappa + d_s) in training and
  evaluation alike, d_s = frac((s + 0.5) * 0.618...) a golden-ratio sequence over the
  token's position s, so training computes exactly what evaluation does and the mean K
  over a sequence tracks the mean kappa. When the dither rounded kappa up, the extra slot
  keeps weight 1 in the forward but carries the gradient of frac(kappa) in the backward
  (a straight-through estimator of the fractional slot below): dL/dw = span * <dL/dy,
  that slot's gated output>, whether the extra expert helped. Tokens rounded down give w
  no gradient from the loss.
- fractional (learned): in training K = ceil(kappa) slots in router order, the last one
  weighted by its mass m = kappa - (K - 1) in (0, 1]; the router's gates give that slot
  m times the weight a whole slot would get (router.compute_gates), so the output moves
  continuously from K - 1 to K slots as kappa grows and dL/dw is exact (tested against
  finite differences). At evaluation K = round(kappa) with whole slots. Training computes
  up to one extra real slot per token; the budget term holds what evaluation computes
  (`num_slots_at_eval_T`), and the layer logs both counts. No positions: the mode for
  sequence- or context-parallel layouts.
- nearest: K = round(kappa). dither: K = floor(kappa + d_s). Integer functions of w: the
  language-model loss never reaches w through them (kept for ablation).

Which won, measured: docs/METHOD.md.

`shuffled_allocation()` is a diagnostic: inside it, evaluation-mode layers draw each
token's kappa from another token of the same forward (a fixed random permutation), so the
mean compute is unchanged and only the token-to-compute assignment is destroyed. The
trainer uses it for `val_loss_shuffled_allocation`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from anyexperts.moe.config import AnyExpertsConfig

# Golden-ratio conjugate: its continued fraction [0; 1, 1, 1, ...] makes frac(s * step) the most
# evenly spread additive recurrence, so every run of consecutive positions covers [0, 1) evenly.
DITHER_STEP = 0.6180339887498949

LEARNED_ROUNDINGS = ("fractional", "straight_through")
POSITIONAL_ROUNDINGS = ("dither", "straight_through")


@dataclass
class SlotAllocation:
    num_slots_T: torch.Tensor                  # int64, in [k_min, k_max]
    last_slot_mass_T: Optional[torch.Tensor]   # float, carries the gradient to w; None = all 1
    # int64 K_i evaluation gives these tokens; None where it is num_slots_T (all but fractional training)
    num_slots_at_eval_T: Optional[torch.Tensor] = None


def num_slots_from_importance(importance_T: torch.Tensor, *, k_min: int, k_max: int) -> torch.Tensor:
    """K_i = k_min + round(w_i * (k_max - k_min)) as int64, clamped to [k_min, k_max].

    torch.round rounds half to even; the clamp only guards w outside [0, 1] (never from a
    sigmoid, but callers may pass their own w).
    """
    span = k_max - k_min
    num_slots_T = k_min + torch.round(importance_T.detach().float() * span).to(torch.int64)
    return num_slots_T.clamp_(k_min, k_max)


def position_dither(position_T: torch.Tensor, *, device=None) -> torch.Tensor:
    """float64 d_s = frac((s + 0.5) * DITHER_STEP) in [0, 1)."""
    return torch.frac((position_T.to(device=device, dtype=torch.float64) + 0.5) * DITHER_STEP)


def dithered_num_slots(importance_T: torch.Tensor, position_T: torch.Tensor, *, k_min: int,
                       k_max: int) -> torch.Tensor:
    """K_i = k_min + floor(w_i * (k_max - k_min) + d_i) as int64.

    Elementwise float64 only (correctly rounded products and sums, no transcendental
    functions): a token's K is the same whatever batch layout it is computed in. w = 0 gives
    floor(d) = 0, so k_min; the clamp keeps w = 1 at k_max should span + d round up to
    span + 1 (d within an ulp of 1), and guards w outside [0, 1] from other callers.
    """
    span = k_max - k_min
    dither_T = position_dither(position_T, device=importance_T.device)
    extra_T = torch.floor(importance_T.detach().double() * span + dither_T).to(torch.int64)
    return k_min + extra_T.clamp_(0, span)


def fractional_slots(importance_T: torch.Tensor, *, k_min: int, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K_i = ceil(kappa_i), mass m_i = kappa_i - (K_i - 1)) for kappa = k_min + w span.

    The mass keeps w's autograd graph (dm/dw = span). K is computed in float64 so that a
    token's K does not depend on the batch layout; kappa within rounding of an integer n
    gives K = n and m = 1 (or K = n + 1 with m ~ 0: the same output either way).
    """
    span = k_max - k_min
    kappa_T = k_min + importance_T * span
    num_slots_T = torch.ceil(k_min + importance_T.detach().double() * span).to(torch.int64).clamp_(k_min, k_max)
    mass_T = (kappa_T - (num_slots_T - 1).to(kappa_T.dtype)).clamp(0.0, 1.0)
    return num_slots_T, mass_T


def straight_through_slots(importance_T: torch.Tensor, position_T: torch.Tensor, *, k_min: int,
                           k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dithered K_i, mass of the last slot: value 1, gradient d frac(kappa)/dw where rounded up)."""
    span = k_max - k_min
    num_slots_T = dithered_num_slots(importance_T, position_T, k_min=k_min, k_max=k_max)
    scaled_T = importance_T * span
    floor_T = torch.floor(scaled_T.detach())
    rounded_up_T = (num_slots_T - k_min).to(scaled_T.dtype) > floor_T
    frac_T = scaled_T - floor_T
    mass_T = 1.0 + torch.where(rounded_up_T, frac_T - frac_T.detach(), torch.zeros_like(frac_T))
    return num_slots_T, mass_T


# --------------------------------------------------------------------------------------
# The shuffled-allocation diagnostic

_SHUFFLE_SEEDS: list[int] = []


@contextlib.contextmanager
def shuffled_allocation(seed: int = 0) -> Iterator[None]:
    """Evaluation-mode layers permute kappa among the tokens of each forward inside this block."""
    _SHUFFLE_SEEDS.append(int(seed))
    try:
        yield
    finally:
        _SHUFFLE_SEEDS.pop()


def shuffle_is_active() -> bool:
    return bool(_SHUFFLE_SEEDS)


def shuffle_permutation(num_tokens: int, *, layer_number: int, device=None) -> torch.Tensor:
    """A fixed random permutation of the tokens of one forward (same for a layer and seed)."""
    gen = torch.Generator().manual_seed(_SHUFFLE_SEEDS[-1] * 1_000_003 + int(layer_number))
    return torch.randperm(num_tokens, generator=gen).to(device)


def allocate_slots(importance_T: Optional[torch.Tensor], position_T: Optional[torch.Tensor], ae: AnyExpertsConfig,
                   *, training: bool, num_tokens: Optional[int] = None, device=None) -> SlotAllocation:
    """K per token (and the last slot's mass in the learned modes) for `ae.k_rounding`.

    With k_min == k_max the importance may be None (a layer that does not compute it): then
    num_tokens and device give the shape."""
    mode, k_min, k_max = ae.k_rounding, ae.k_min, ae.k_max
    if k_min == k_max:  # one slot count for every token: nothing to allocate or learn
        if importance_T is not None:
            num_tokens, device = importance_T.shape[0], importance_T.device
        return SlotAllocation(torch.full((num_tokens,), k_min, dtype=torch.int64, device=device), None)
    if importance_T is None:
        raise ValueError(f"importance_T: k_min={k_min} < k_max={k_max} allocates slots from each token's importance")
    if mode in POSITIONAL_ROUNDINGS and position_T is None:
        raise ValueError(f"position_T: k_rounding={mode!r} needs each token's sequence position")
    if mode == "fractional":
        if training:
            num_slots_T, mass_T = fractional_slots(importance_T, k_min=k_min, k_max=k_max)
            at_eval_T = num_slots_from_importance(importance_T, k_min=k_min, k_max=k_max)
            return SlotAllocation(num_slots_T, mass_T, at_eval_T)
        return SlotAllocation(num_slots_from_importance(importance_T, k_min=k_min, k_max=k_max), None)
    if mode == "straight_through":
        num_slots_T, mass_T = straight_through_slots(importance_T, position_T, k_min=k_min, k_max=k_max)
        return SlotAllocation(num_slots_T, mass_T if training else None)
    if mode == "dither":
        num_slots_T = dithered_num_slots(importance_T, position_T, k_min=k_min, k_max=k_max)
    else:
        num_slots_T = num_slots_from_importance(importance_T, k_min=k_min, k_max=k_max)
    return SlotAllocation(num_slots_T, None)
