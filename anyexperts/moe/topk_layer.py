"""The project's top-k path: megatron-core's MoELayer (`moe=topk moe.grouped_gemm=true`).

    spec = ModuleSpec(module=TopKMoELayer, submodules=MoESubmodules(experts=grouped_experts_spec()))

megatron's MoELayer with its TopKRouter and aux losses, the project's GroupedExperts, and the
project's dispatcher (moe/dispatcher.py, VariableSlotAllToAll) behind megatron's token-dispatcher
interface, in place of MoEAlltoAllTokenDispatcher (anyexperts.model.layer_specs builds the spec;
moe.token_dispatcher=allgather keeps megatron's allgather dispatcher).
megatron's dispatcher permutes through the dense [T, E] routing map (a transposed copy, a masked
select of the probabilities, a sort), and where a rank holds several experts it reorders the
received rows by expert and back with a split and a cat of every row, also where that order is
the identity (one rank). The project's dispatcher sorts the [T, k] slots once, gathers the rows
with one index_select and combines with one index_add_. The routing, the aux losses and the
expert math are megatron's and GroupedExperts'; outputs and gradients equal those of megatron's
dispatcher up to the order of the sums (tests/test_topk_layer.py, EP = 1 and 2). moe=topk
without grouped_gemm stays megatron's own layer, the baseline the benchmarks compare against.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from anyexperts.moe.dispatcher import VariableSlotAllToAll


class SlotTokenDispatcher:
    """The six calls megatron's MoELayer makes of a token dispatcher, over VariableSlotAllToAll.

    dispatch_preprocess turns the router's dense (routing_map_TE, probs_TE) into k slots per
    token (expert_TK, gate_TK); a slot whose expert was dropped (a capacity factor) gets -1.
    """

    def __init__(self, *, num_experts: int, topk: int, ep_group) -> None:
        self.slots = VariableSlotAllToAll(num_experts=num_experts, ep_group=ep_group)
        self.topk = topk
        self._expert_TK: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        self._hidden_shape: Optional[torch.Size] = None

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map_TE: torch.Tensor, probs_TE: torch.Tensor):
        self._hidden_shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        chosen_TK = routing_map_TE.to(probs_TE.dtype).topk(self.topk, dim=1).indices
        self._expert_TK = chosen_TK.masked_fill(~routing_map_TE.gather(1, chosen_TK), -1)
        return hidden_TH, probs_TE.gather(1, chosen_TK)

    def token_dispatch(self, hidden_TH: torch.Tensor, gate_TK: torch.Tensor):
        expert_TK, self._expert_TK = self._expert_TK, None
        tokens_NH, self._counts, probs_N = self.slots.dispatch(hidden_TH, expert_TK, gate_TK)
        return tokens_NH, probs_N

    def dispatch_postprocess(self, tokens_NH: torch.Tensor, probs_N: torch.Tensor):
        counts, self._counts = self._counts, None
        return tokens_NH, counts, probs_N

    def combine_preprocess(self, expert_out_NH: torch.Tensor) -> torch.Tensor:
        return expert_out_NH

    def token_combine(self, expert_out_NH: torch.Tensor) -> torch.Tensor:
        return self.slots.combine(expert_out_NH)

    def combine_postprocess(self, y_TH: torch.Tensor) -> torch.Tensor:
        return y_TH.view(*self._hidden_shape[:-1], y_TH.shape[-1])


class TopKMoELayer(MoELayer):
    """megatron's MoELayer (router, aux losses) with the project's dispatcher (module docstring)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        if config.moe_token_dispatcher_type != "alltoall":
            return  # another dispatcher asked for by name (moe.token_dispatcher): megatron's
        for name, unsupported in (("moe_shared_expert_intermediate_size", self.use_shared_expert),
                                  ("moe_pad_expert_input_to_capacity", config.moe_pad_expert_input_to_capacity),
                                  ("moe_latent_size", getattr(config, "moe_latent_size", None))):
            if unsupported:
                raise ValueError(f"{name}: not supported by the project's top-k path; use megatron's own "
                                 "MoELayer (moe.grouped_gemm=false)")
        ep_group = pg_collection.ep if pg_collection.ep is not None and pg_collection.ep.size() > 1 else None
        self.token_dispatcher = SlotTokenDispatcher(num_experts=config.num_moe_experts, topk=config.moe_router_topk,
                                                    ep_group=ep_group)
