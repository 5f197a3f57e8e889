"""Step 3 of the AnyExperts layer: per-expert capacity with importance-aware dropping.

    plan = apply_capacity(routing.real_expert_TK, importance_T, num_experts=E, capacity_factor=1.25)
    plan.expert_TK     # int64 [T, K]: real expert per slot, -1 on virtual, unused and dropped slots
    plan.dropped_TK    # bool: real slots removed by the limit
    plan.num_dropped   # int64 scalar tensor (no host sync)

Capacity is counted in REAL-slot units: an expert may take
    capacity = ceil(capacity_factor * (real slots selected on this rank) / E)
slots; virtual slots never count, since they never leave the rank. capacity_factor None
means no limit (nothing is dropped and this step is skipped).

Importance-aware dropping: when an expert is over capacity, the slots of the least
important tokens (lowest w) are dropped first; ties go to the earlier token. A dropped
slot keeps its gate (gates are not renormalised, as in megatron's drop policy): the token
loses that expert's contribution, keeps its other slots, its virtual term and its
residual fusion, so even a token whose every real slot is dropped still has an output.
Nothing is dropped silently: the layer records the count as the `dropped_slots` statistic.

The decision is local to each rank: the capacity comes from this rank's own real slots,
and only this rank's slots are dropped, with no communication (as megatron's
token-dropping router does). An expert then receives at most (EP size x capacity) slots
in total. A global decision would need an all-gather of every slot's expert and
importance before the dispatch, which costs more than the dispatch's own count exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CapacityPlan:
    expert_TK: torch.Tensor               # slots kept: real expert id, else -1
    dropped_TK: torch.Tensor              # bool, real slots dropped by the limit
    capacity: Optional[torch.Tensor]      # int64 scalar tensor, None without a limit

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.dropped_TK.sum()


def expert_capacity(num_real_slots: torch.Tensor, *, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """ceil(capacity_factor * num_real_slots / E) as an int64 tensor (stays on device)."""
    return torch.ceil(num_real_slots.double() * capacity_factor / num_experts).to(torch.int64)


def rank_within_expert(expert_TK: torch.Tensor, importance_T: torch.Tensor, *, num_experts: int) -> torch.Tensor:
    """For every real slot, how many slots of the same expert belong to more important
    tokens (0 = the most important token of that expert). -1 slots get rank >= T * K.

    One stable sort of the tokens by importance, then one sort of the slots by
    (expert, importance order): a token holds an expert at most once, so keys are unique.
    """
    num_tokens, num_slots = expert_TK.shape
    order_T = torch.argsort(importance_T.detach().float(), descending=True, stable=True)
    importance_rank_T = torch.empty_like(order_T)
    importance_rank_T[order_T] = torch.arange(num_tokens, device=order_T.device)
    expert_N = torch.where(expert_TK >= 0, expert_TK, torch.full_like(expert_TK, num_experts)).reshape(-1)
    key_N = expert_N * num_tokens + importance_rank_T.repeat_interleave(num_slots)
    slot_order_N = torch.argsort(key_N)
    counts_X = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_TK.device)
    counts_X.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    starts_X = counts_X.cumsum(0) - counts_X
    sorted_expert_N = expert_N[slot_order_N]
    rank_sorted_N = torch.arange(key_N.numel(), device=key_N.device) - starts_X[sorted_expert_N]
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[slot_order_N] = rank_sorted_N
    # Non-real slots sit in group E: push them past any capacity.
    rank_N = torch.where(expert_N == num_experts, rank_N + key_N.numel(), rank_N)
    return rank_N.view(num_tokens, num_slots)


def apply_capacity(expert_TK: torch.Tensor, importance_T: torch.Tensor, *, num_experts: int,
                   capacity_factor: Optional[float]) -> CapacityPlan:
    """Drops, per expert, the real slots past its capacity, least important tokens first."""
    is_real_TK = expert_TK >= 0
    if capacity_factor is None:
        return CapacityPlan(expert_TK=expert_TK, dropped_TK=torch.zeros_like(is_real_TK), capacity=None)
    capacity = expert_capacity(is_real_TK.sum(), num_experts=num_experts, capacity_factor=capacity_factor)
    rank_TK = rank_within_expert(expert_TK, importance_T, num_experts=num_experts)
    dropped_TK = is_real_TK & (rank_TK >= capacity)
    kept_TK = expert_TK.masked_fill(dropped_TK, -1)
    return CapacityPlan(expert_TK=kept_TK, dropped_TK=dropped_TK, capacity=capacity)
