"""What a routing method of the AnyExperts layer is: a megatron-core `Router` that maps
hidden states to a `Routing` (anyexperts/moe/router.py), the one contract the layer,
capacity, dispatcher, statistics and traces read.

    router = TopPRouter(config, routing_config=TopPConfig(target_real_experts=2.0))
    routing = router(hidden_TH)            # Routing with K = max_experts slot columns
    routing.router_loss                    # the method's own regulariser (coefficient included)

A method that needs no importance (the rivals here) sets `uses_importance = False`: the layer
then builds no importance predictor. `slot_range` is the range of `Routing.num_slots_T`
(the layer's K histogram spans it). A method whose compute is held by a budget controller
(budget.py) exposes it as `controller`; losses.update_selection_biases steps it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe.router import Routing, router_logits
from anyexperts.moe.routers.budget import RealExpertsController


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def real_only_routing(logits_TE: torch.Tensor, entry_TK: torch.Tensor, gate_TK: torch.Tensor, **extra) -> Routing:
    """A Routing over real experts only: entry_TK holds expert ids, -1 on unused slots."""
    is_used_TK = entry_TK >= 0
    return Routing(logits_TX=logits_TE, num_slots_T=is_used_TK.sum(-1), entry_TK=entry_TK,
                   gate_TK=gate_TK.masked_fill(~is_used_TK, 0.0), is_virtual_TK=torch.zeros_like(is_used_TK),
                   real_expert_TK=entry_TK, **extra)


class SlotRouter(Router):
    """Base of the routers that choose each token's real experts from E router logits alone."""

    uses_importance = False

    def __init__(self, config: TransformerConfig, pg_collection=None, *, routing_config,
                 anyexperts_config=None) -> None:
        """routing_config: the method's settings (validated here, with max_experts); anyexperts_config:
        the layer's shared settings (losses, capacity), which the layer reads, not the router."""
        routing_config.validate(num_experts=config.num_moe_experts)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        self.routing_config = routing_config
        max_experts = routing_config.max_experts
        self.max_experts = self.num_experts if max_experts is None else max_experts

    @property
    def slot_range(self) -> tuple[int, int]:
        return 0, self.max_experts

    @abstractmethod
    def route(self, logits_TE: torch.Tensor) -> Routing:
        """The method's Routing for router logits [T, E]."""

    def routing(self, logits: torch.Tensor):  # megatron's abstract hook; route() returns a Routing
        raise NotImplementedError(f"{type(self).__name__} routes with route(logits_TE)")

    def forward(self, hidden_TH: torch.Tensor, importance_T: Optional[torch.Tensor] = None,
                position_T: Optional[torch.Tensor] = None) -> Routing:
        """importance_T and position_T are accepted for the layer's call and unused."""
        routing = self.route(router_logits(self, hidden_TH))
        if self.training and torch.is_grad_enabled():
            for controller in self.children():
                if isinstance(controller, RealExpertsController):
                    controller.count(routing.num_real_T)  # no-op when inactive
        return routing
