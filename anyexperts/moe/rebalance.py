"""Least-loaded expert parallelism: which rank computes which slots of each expert, per step.

    config = RebalanceConfig(enable=True, threshold=1.3, cap_factor=1.0, min_chunk=1)
    plan = plan_rebalance(counts_RE, config)      # counts_RE: all-gathered slots per (rank, expert)
    plan.active                                    # False: plain expert parallelism this step
    plan.flows_SDE[s, d, e]                        # slots of expert e that rank s sends to rank d
    plan.borrowed(d)                               # experts rank d computes for other ranks
    plan.lent(h)                                   # (expert, helper) pairs whose weights rank h sends

Pure host-side logic on small integer tensors: the dispatcher executes the plan
(dispatcher.py), the routers and the experts never see it. Every rank calls this with the
same all-gathered counts, so every rank computes the same plan and takes the same branch:
that is what keeps the collectives in one order on all ranks whatever the loads.

Rank r owns the contiguous experts [r L, (r + 1) L). The load of a rank is the number of
slots it computes; N slots over R ranks have mean N / R. When the largest home load is at most
`threshold` x mean (or N = 0) the plan is inactive and nothing moves. Otherwise, with
cap = ceil(cap_factor x N / R):
1. Experts in descending slot count (longest-processing-time order; ties to the lower id).
2. An expert keeps slots on its home rank up to the cap, where the home's load counts what
   it was given so far plus its own experts not yet placed: a rank is never filled by other
   ranks' spill past the room its own experts need.
3. The rest is spilled to the least-loaded other ranks (same effective load), each chunk
   up to the helper's room; a chunk smaller than `min_chunk` is not worth the weights it
   needs, so such a helper is skipped unless the chunk is all that is left. What no helper
   takes stays on the home rank (over the cap).
4. Which source rank's slots go where: every compute rank first takes the slots of that
   expert it already holds (no move for them), the rest fill up in rank order. Within one
   source rank and expert the slots keep their order and go to ascending destinations.

Routing is not changed, so the step computes exactly what the plain step computes.
Tests: tests/test_rebalance.py. Benchmark: tools/bench_balancer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RebalanceConfig:
    # Move slots of hot experts to less loaded ranks (with the experts' weights).
    enable: bool = False
    # Plan only when the most loaded rank holds more than threshold x the mean slots per rank.
    threshold: float = 1.3
    # Per-rank cap on computed slots: cap_factor x (slots / ranks), rounded up.
    cap_factor: float = 1.0
    # Smallest number of slots moved to one helper (except an expert's last remainder):
    # each move costs a copy of the expert's weights. The paper's 1024 suits GPUs.
    min_chunk: int = 1

    def validate(self, prefix: str = "") -> None:
        """Raises ValueError naming the field (with `prefix`, e.g. 'moe.rebalance.')."""
        if not self.threshold >= 1.0:
            raise ValueError(f"{prefix}threshold={self.threshold!r} must be >= 1 (max/mean rank load is never below 1)")
        if not self.cap_factor > 0:
            raise ValueError(f"{prefix}cap_factor={self.cap_factor!r} must be > 0")
        if not (isinstance(self.min_chunk, int) and self.min_chunk >= 1):
            raise ValueError(f"{prefix}min_chunk={self.min_chunk!r} must be an integer >= 1")


@dataclass
class RebalancePlan:
    ep_size: int
    num_local_experts: int
    imbalance_before: float          # max / mean home load (1.0 without slots)
    imbalance_after: float           # max / mean computed load
    load_before_R: torch.Tensor      # int64 [R]: slots of each rank's own experts
    load_after_R: torch.Tensor       # int64 [R]: slots each rank computes under the plan
    flows_SDE: Optional[torch.Tensor] = None   # int64 [R, R, E]; None when inactive

    @property
    def active(self) -> bool:
        return self.flows_SDE is not None

    def home(self, expert: int) -> int:
        return expert // self.num_local_experts

    def computed_by_RE(self) -> torch.Tensor:
        """bool [R, E]: rank d computes some slots of expert e (inactive: its own experts)."""
        if self.flows_SDE is None:
            home_E = torch.arange(self.ep_size * self.num_local_experts) // self.num_local_experts
            return home_E.unsqueeze(0) == torch.arange(self.ep_size).unsqueeze(1)
        return self.flows_SDE.sum(0) > 0

    def borrowed(self, rank: int) -> list[int]:
        """Experts of other ranks that `rank` computes slots of, ascending."""
        if self.flows_SDE is None:
            return []
        local = self.num_local_experts
        return [e for e in torch.nonzero(self.flows_SDE[:, rank].sum(0)).flatten().tolist() if e // local != rank]

    def lent(self, rank: int) -> list[tuple[int, int]]:
        """(expert, helper) pairs: `rank`'s experts whose weights go to a helper, helper-major."""
        if self.flows_SDE is None:
            return []
        local = self.num_local_experts
        own = slice(rank * local, (rank + 1) * local)
        used_DL = self.flows_SDE[:, :, own].sum(0) > 0
        used_DL[rank] = False
        return [(rank * local + e, d) for d, e in torch.nonzero(used_DL).tolist()]

    @property
    def num_moved_slots(self) -> int:
        """Slots computed on a rank other than their expert's home (all ranks together)."""
        if self.flows_SDE is None:
            return 0
        home_E = torch.arange(self.flows_SDE.shape[2]) // self.num_local_experts
        at_home = self.flows_SDE.sum(0)[home_E, torch.arange(home_E.numel())].sum()
        return int(self.flows_SDE.sum() - at_home)

    @property
    def num_weight_copies(self) -> int:
        """(expert, helper) pairs over all ranks: each sends one expert's weights forward and
        its gradient back."""
        return sum(len(self.lent(r)) for r in range(self.ep_size)) if self.flows_SDE is not None else 0


def _imbalance(load_R: torch.Tensor) -> float:
    total = int(load_R.sum())
    return float(load_R.max()) * load_R.numel() / total if total else 1.0


def plan_rebalance(counts_RE: torch.Tensor, config: RebalanceConfig) -> RebalancePlan:
    """The plan for one layer and step from every rank's slots per global expert (int64 [R, E])."""
    counts_RE = torch.as_tensor(counts_RE, dtype=torch.int64).cpu()
    num_ranks, num_experts = counts_RE.shape
    if num_experts % num_ranks:
        raise ValueError(f"counts_RE has {num_experts} experts, not a multiple of {num_ranks} ranks")
    local = num_experts // num_ranks
    total_E = counts_RE.sum(0)
    load_R = total_E.view(num_ranks, local).sum(1)
    before = _imbalance(load_R)
    num_slots = int(load_R.sum())
    inactive = RebalancePlan(num_ranks, local, before, before, load_R, load_R)
    if num_ranks == 1 or num_slots == 0 or before <= config.threshold:
        return inactive

    cap = math.ceil(config.cap_factor * num_slots / num_ranks)
    totals = total_E.tolist()
    pending = load_R.tolist()       # slots of each rank's own experts not yet placed
    assigned = [0] * num_ranks
    amounts_ED = [[0] * num_ranks for _ in range(num_experts)]
    for expert in sorted(range(num_experts), key=lambda e: (-totals[e], e)):
        rest = totals[expert]
        if rest == 0:
            break
        home = expert // local
        pending[home] -= rest
        keep = min(rest, max(0, cap - assigned[home] - pending[home]))
        amounts = amounts_ED[expert]
        amounts[home] += keep
        assigned[home] += keep
        rest -= keep
        helpers = sorted((r for r in range(num_ranks) if r != home), key=lambda r: (assigned[r] + pending[r], r))
        for helper in helpers:
            if rest == 0:
                break
            chunk = min(rest, cap - assigned[helper] - pending[helper])
            if chunk <= 0 or (chunk < config.min_chunk and chunk < rest):
                continue
            amounts[helper] += chunk
            assigned[helper] += chunk
            rest -= chunk
        amounts[home] += rest
        assigned[home] += rest

    flows_SDE = _match_sources(counts_RE, torch.tensor(amounts_ED, dtype=torch.int64))
    load_after_R = flows_SDE.sum((0, 2))
    after = _imbalance(load_after_R)
    if after >= before:  # nothing gained (e.g. chunks too coarse): do not pay for the moves
        return inactive
    return RebalancePlan(num_ranks, local, before, after, load_R, load_after_R, flows_SDE)


def _match_sources(counts_RE: torch.Tensor, amounts_ED: torch.Tensor) -> torch.Tensor:
    """flows [S, D, E] with sum_d = counts_RE (what each source holds) and sum_s = amounts_ED.T
    (what each rank computes): local slots first, then the rest in rank order."""
    num_ranks, num_experts = counts_RE.shape
    flows_SDE = torch.zeros(num_ranks, num_ranks, num_experts, dtype=torch.int64)
    # Most experts are computed by one rank: every source sends it all, in one vectorised write.
    whole_E = (amounts_ED > 0).sum(1) <= 1
    whole = torch.nonzero(whole_E).flatten()
    sources = torch.arange(num_ranks).unsqueeze(1)
    flows_SDE[sources, amounts_ED[whole].argmax(1).unsqueeze(0), whole.unsqueeze(0)] = counts_RE[:, whole]
    split = torch.nonzero(~whole_E).flatten()
    if split.numel() == 0:
        return flows_SDE
    # The few split experts in plain Python (element-wise tensor updates cost ~10 us each).
    index_s, index_d, index_e, values = [], [], [], []
    for expert, held, needs in zip(split.tolist(), counts_RE[:, split].t().tolist(), amounts_ED[split].tolist()):
        for rank in range(num_ranks):
            stay = min(held[rank], needs[rank])
            if stay:
                index_s.append(rank), index_d.append(rank), index_e.append(expert), values.append(stay)
                held[rank] -= stay
                needs[rank] -= stay
        dst = 0
        for src in range(num_ranks):
            while held[src] > 0:
                while needs[dst] == 0:
                    dst += 1
                moved = min(held[src], needs[dst])
                index_s.append(src), index_d.append(dst), index_e.append(expert), values.append(moved)
                held[src] -= moved
                needs[dst] -= moved
    flows_SDE.index_put_((torch.tensor(index_s), torch.tensor(index_d), torch.tensor(index_e)),
                         torch.tensor(values, dtype=torch.int64), accumulate=True)
    return flows_SDE
