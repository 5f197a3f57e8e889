"""Top-p routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", arXiv
2403.07652), with a threshold controller that holds a mean real-expert count (DTop-p's idea).

    router = TopPRouter(config, routing_config=TopPConfig(top_p=0.4, target_real_experts=2.0))
    routing = router(hidden_TH)        # K = max_experts columns, slots in probability order

Per token, with probs_TE = softmax over the E router logits: the experts in descending
probability until their running sum reaches p; the expert that crosses p is included, so
every token gets at least one (and at most max_experts). Gates are the raw probabilities,
not renormalised over the selected set: the selection is a discrete function of the
probabilities, and raw gates are how the LM loss reaches them.

The paper's regulariser, router_loss = entropy_coeff * mean over tokens of H(probs_TE): a
router that flattens its distribution gets more experts per token for the same p; the
entropy term makes that cost something. Logged per layer: entropy_loss (the term without
its coefficient) and top_p.

p lives in `controller.value` (budget.py, additive rule, clipped to [1e-3, 1]): with
target_real_experts set, after each optimizer step p += p_update_rate * (target - R), R the
step's mean real experts per token over the data-parallel ranks; p is saved with the model.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe.config import AnyExpertsConfig, TopPConfig
from anyexperts.moe.router import Routing
from anyexperts.moe.routers.base import SlotRouter, at_least_fp32, real_only_routing
from anyexperts.moe.routers.budget import RealExpertsController

MIN_TOP_P = 1e-3


def top_p_entries(probs_TE: torch.Tensor, top_p, *, max_experts: int) -> torch.Tensor:
    """int64 [T, max_experts]: expert ids in descending probability, the minimal prefix whose
    summed probability reaches top_p (at least one, at most max_experts), -1 past it."""
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True)
    sorted_TK, order_TK = sorted_TE[:, :max_experts], order_TE[:, :max_experts]
    # Mass of the experts ranked before each one: a slot is taken while that is below p.
    mass_before_TK = torch.cat([torch.zeros_like(sorted_TK[:, :1]), sorted_TK.cumsum(-1)[:, :-1]], dim=-1)
    is_selected_TK = mass_before_TK < top_p
    return order_TK.masked_fill(~is_selected_TK, -1)


def router_entropy(probs_TE: torch.Tensor, log_probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_e p_e log p_e (0 without tokens)."""
    return -(probs_TE * log_probs_TE).sum(-1).sum() / max(probs_TE.shape[0], 1)


class TopPRouter(SlotRouter):
    def __init__(self, config: TransformerConfig, pg_collection=None, *, routing_config: TopPConfig,
                 anyexperts_config: Optional[AnyExpertsConfig] = None) -> None:
        super().__init__(config, pg_collection, routing_config=routing_config)
        self.controller = RealExpertsController(initial=routing_config.top_p,
                                                target=routing_config.target_real_experts, rule="additive",
                                                rate=routing_config.p_update_rate, min_value=MIN_TOP_P,
                                                max_value=1.0, raises_count=True)

    @property
    def slot_range(self) -> tuple[int, int]:
        return 1, self.max_experts

    @property
    def top_p(self) -> torch.Tensor:
        return self.controller.value

    def route(self, logits_TE: torch.Tensor) -> Routing:
        logits_TE = at_least_fp32(logits_TE)
        log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
        probs_TE = log_probs_TE.exp()
        with torch.no_grad():
            entry_TK = top_p_entries(probs_TE.detach(), self.top_p.to(probs_TE.dtype), max_experts=self.max_experts)
        gate_TK = probs_TE.gather(1, entry_TK.clamp(min=0))
        entropy = router_entropy(probs_TE, log_probs_TE)
        coeff = self.routing_config.entropy_coeff
        return real_only_routing(logits_TE, entry_TK, gate_TK, router_loss=coeff * entropy if coeff > 0 else None,
                                 router_stats={"entropy_loss": entropy.detach(), "top_p": self.top_p[0].clone()})
