"""ReMoE routing (ICLR'25, arXiv 2412.14711): ReLU gates with an adaptive L1 penalty.

    router = ReLURouter(config, routing_config=ReMoEConfig(target_real_experts=2.0))
    routing = router(hidden_TH)        # K = max_experts columns, slots in gate order

gates_TE = ReLU(router logits): expert e is active for a token where its gate is > 0, and
the gate itself scales the expert's output, so the LM loss moves every active gate (and
one that reaches 0 switches the expert off). A token may get no expert at all (the
residual carries it); with max_experts < E the largest max_experts gates are kept.

router_loss = lambda * mean over tokens of sum_e w_e gate_te, with w_e = 1, or with
l1_balance the expert's share of this forward's active slots, E n_e / sum n (no
gradient; the paper's load-balanced L1: busy experts are pushed down harder). Logged per
layer: l1_loss (the term without lambda) and l1_coeff (lambda).

lambda lives in `controller.value` (budget.py, multiplicative rule): with
target_real_experts set, after each optimizer step lambda *= l1_coeff_factor ** sign(R -
target), R the step's mean real experts per token over the data-parallel ranks (the
paper's lambda <- lambda alpha^sign(target sparsity - sparsity), with sparsity 1 - R / E).
Unlike the paper, whose one lambda serves every layer, each layer holds its own lambda and
so its own count at the target, as top-p's controller does. With threshold_rate > 0 (off in
the paper's setting) every gate is ReLU(logit + b), b a second controller (additive,
`shift.value`, logged as gate_shift): the L1 only closes gates, and a closed gate gets no
gradient, so a layer whose gates the language-model loss closed early stays below target
without it.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe.config import AnyExpertsConfig, ReMoEConfig
from anyexperts.moe.router import Routing, count_per_expert
from anyexperts.moe.routers.base import SlotRouter, at_least_fp32, real_only_routing
from anyexperts.moe.routers.budget import RealExpertsController

# Bounds that keep lambda a finite positive number however long the count stays off target.
MIN_L1_COEFF, MAX_L1_COEFF = 1e-20, 1e4
# The gate shift's range, in logit units.
MAX_ABS_SHIFT = 10.0


def active_entries(gates_TE: torch.Tensor, *, max_experts: int) -> torch.Tensor:
    """int64 [T, max_experts]: experts with a positive gate in descending gate order, -1 past them."""
    top_TK, order_TK = gates_TE.topk(max_experts, dim=-1, sorted=True)
    return order_TK.masked_fill(top_TK <= 0, -1)


def l1_penalty(gates_TE: torch.Tensor, entry_TK: torch.Tensor, *, balance: bool) -> torch.Tensor:
    """Mean over tokens of sum_e w_e gate_te (see the module docstring for w)."""
    num_tokens, num_experts = gates_TE.shape
    if balance:
        with torch.no_grad():
            active_E = count_per_expert(entry_TK, num_experts=num_experts, dtype=gates_TE.dtype)
            weight_E = num_experts * active_E / active_E.sum().clamp(min=1)
        gates_TE = gates_TE * weight_E
    return gates_TE.sum() / max(num_tokens, 1)


class ReLURouter(SlotRouter):
    def __init__(self, config: TransformerConfig, pg_collection=None, *, routing_config: ReMoEConfig,
                 anyexperts_config: Optional[AnyExpertsConfig] = None) -> None:
        super().__init__(config, pg_collection, routing_config=routing_config)
        self.controller = RealExpertsController(initial=routing_config.l1_coeff,
                                                target=routing_config.target_real_experts,
                                                rule="multiplicative", rate=routing_config.l1_coeff_factor,
                                                min_value=MIN_L1_COEFF, max_value=MAX_L1_COEFF, raises_count=False)
        # Only with threshold_rate > 0, so that checkpoints of the paper's router load unchanged.
        self.shift = None
        if routing_config.threshold_rate > 0:
            self.shift = RealExpertsController(initial=0.0, target=routing_config.target_real_experts,
                                               rule="additive", rate=routing_config.threshold_rate,
                                               min_value=-MAX_ABS_SHIFT, max_value=MAX_ABS_SHIFT, raises_count=True)

    @property
    def l1_coeff(self) -> torch.Tensor:
        return self.controller.value

    def route(self, logits_TE: torch.Tensor) -> Routing:
        logits_TE = at_least_fp32(logits_TE)
        if self.shift is not None:
            logits_TE = logits_TE + self.shift.value.to(logits_TE.dtype)
        gates_TE = torch.relu(logits_TE)
        with torch.no_grad():
            entry_TK = active_entries(gates_TE.detach(), max_experts=self.max_experts)
        gate_TK = gates_TE.gather(1, entry_TK.clamp(min=0))
        l1 = l1_penalty(gates_TE, entry_TK, balance=self.routing_config.l1_balance)
        router_loss = self.l1_coeff[0].to(l1.dtype) * l1
        return real_only_routing(logits_TE, entry_TK, gate_TK, router_loss=router_loss,
                                 router_stats={"l1_loss": l1.detach(), "l1_coeff": self.l1_coeff[0].clone(),
                                               **({"gate_shift": self.shift.value[0].clone()}
                                                  if self.shift is not None else {})})
