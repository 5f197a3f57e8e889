"""AnyExpertsMoELayer: a megatron-core MoE layer with a variable number of experts per token.

Build it through the spec (anyexperts/moe/specs.py, get_anyexperts_layer_spec) or directly:

    layer = AnyExpertsMoELayer(config, MoESubmodules(experts=ModuleSpec(module=GroupedExperts)),
                               layer_number=1, anyexperts_config=AnyExpertsConfig(k_min=2, k_max=6))
    out, bias = layer(hidden_SBH)          # bias is always None

The data path of one forward, top to bottom (T tokens = seq x batch on this rank, E real
experts, V virtual experts, K = k_max slot columns):

  h [T, H]
  -> importance  w = sigmoid(MLP(h))                                     importance.py
  -> allocation  K_i from kappa_i = k_min + w_i (k_max - k_min): learned straight-
                 through (default) or fractional last slot, round, dither allocation.py
  -> router      logits over E + V; top K_i with at most floor(rho_max K_i)
                 virtual; gates (the last slot scaled by its mass)        router.py
  -> capacity    per-expert limit in real slots, least important dropped  capacity.py
  -> dispatcher  only real slots, one all_to_all_single (EP group)        dispatcher.py
  -> experts     g * FFN_e(x) over expert-sorted rows (gate applied here) experts.py (or megatron's
                                                                          SequentialMLP / TEGroupedMLP)
  -> combine     back to the owning rank, sum over each token's slots    dispatcher.py
  -> virtual     zero / copy (g h) / constant (g (a1 h + a2 v)), on rank  layer.py (VirtualExperts)
  -> fusion      out = y + alpha * w * h                                  layer.py
  aux losses (load balance, budget, z) attached to out                   losses.py
  statistics and routing traces (split by modality with a TokenInfo)    stats.py, trace.py

Per-token side information (the modality of each token) comes from token_info.current(): a
TokenInfo set around the forward (token_info.use, or token_info.attach's hooks on the model).

The router is submodules.router: AnyExpertsRouter (router.py) by default, or a rival routing
method (routers/: TopPRouter, ReLURouter; get_anyexperts_moe_spec picks it from the config's
type). Every router returns the same `Routing`, so nothing below it branches on the method;
a router that needs no importance (`uses_importance = False`) gets no importance predictor
(w is then absent: capacity drops the tokens with the smallest total gate first), and its
own regulariser (Routing.router_loss) is attached with the aux losses.

Expert weights live in megatron's expert-parallel layout: rank r of the expert-parallel
group holds experts [r E/ep, (r+1) E/ep), marked allreduce=False by the expert module, so
megatron DDP reduces their gradients over the expert-data-parallel group; everything else
here (importance MLP, router, virtual experts, alpha) is replicated (allreduce=True).

Process groups: megatron's TransformerLayer passes a pg_collection only to its own MoELayer
class (transformer_layer.py:352 checks the exact class), so this layer, given none, takes
parallel_state's groups (get_default_pg_collection). Tests pass their own collection.

The importance MLP is frozen (requires_grad=False) when nothing gives w a gradient: no
learned allocation, no residual fusion (alpha = 0 and not learned) and no budget loss. w
then still sets K and the capacity order, from its initial weights; an unfrozen MLP would
only stall megatron DDP, which waits for gradients that never come.

Not supported (ValueError): shared experts, MoE latent projections, tensor-parallel experts
through GroupedExperts, the positional k_roundings (dither, straight_through) with
sequence or context parallelism.
`padding_mask` is accepted for megatron's call signature and ignored: every token is routed
and counted (the trainer packs sequences without padding).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe import allocation, stats, token_info, trace
from anyexperts.moe.allocation import LEARNED_ROUNDINGS, POSITIONAL_ROUNDINGS
from anyexperts.moe.capacity import CapacityPlan, apply_capacity
from anyexperts.moe.config import AnyExpertsConfig
from anyexperts.moe.dispatcher import VariableSlotAllToAll
from anyexperts.moe.importance import ImportancePredictor
from anyexperts.moe.losses import AuxLosses, AuxLossTerms
from anyexperts.moe.rebalance import RebalanceConfig
from anyexperts.moe.router import AnyExpertsRouter, Routing, count_per_expert, sequence_positions


class VirtualExperts(nn.Module):
    """Outputs of the selected virtual experts, summed with their gates; never dispatched.

    zero: 0 (no parameters). copy: g * h. constant (MoE++): g * (a1 h + a2 v_j) with a
    learned vector v_j per virtual expert j and [a1, a2] = softmax(W_j h).
    """

    def __init__(self, *, kind: str, num_virtual_experts: int, num_experts: int, hidden_size: int,
                 init_method=None, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = kind
        self.num_virtual_experts = num_virtual_experts
        self.num_experts = num_experts
        if kind == "constant" and num_virtual_experts > 0:
            self.constant_VH = nn.Parameter(torch.empty(num_virtual_experts, hidden_size, dtype=params_dtype))
            self.mix = nn.Linear(hidden_size, 2 * num_virtual_experts, bias=False, dtype=params_dtype)
            with torch.no_grad():
                if init_method is not None:
                    init_method(self.constant_VH)
                    init_method(self.mix.weight)
                else:
                    nn.init.normal_(self.constant_VH, std=0.02)

    def forward(self, hidden_TH: torch.Tensor, routing: Routing) -> Optional[torch.Tensor]:
        if self.kind == "zero" or self.num_virtual_experts == 0:
            return None
        gate_TK = routing.gate_TK.masked_fill(~routing.is_virtual_TK, 0.0).to(hidden_TH.dtype)
        if self.kind == "copy":
            return gate_TK.sum(-1, keepdim=True) * hidden_TH
        num_tokens, num_virtual = hidden_TH.shape[0], self.num_virtual_experts
        # Gate of each virtual expert per token; non-virtual slots land in a spare column V.
        column_TK = torch.where(routing.is_virtual_TK, routing.entry_TK - self.num_experts,
                                torch.full_like(routing.entry_TK, num_virtual))
        gate_TV = hidden_TH.new_zeros(num_tokens, num_virtual + 1).scatter_add(1, column_TK, gate_TK)[:, :num_virtual]
        mix_TV2 = self.mix(hidden_TH).view(num_tokens, num_virtual, 2)
        mix_TV2 = torch.softmax(mix_TV2 if mix_TV2.dtype == torch.float64 else mix_TV2.float(), dim=-1)
        mix_TV2 = mix_TV2.to(hidden_TH.dtype)
        copy_share_T1 = (gate_TV * mix_TV2[..., 0]).sum(-1, keepdim=True)
        return copy_share_T1 * hidden_TH + (gate_TV * mix_TV2[..., 1]) @ self.constant_VH


def _router_spec(router):
    """The router class or ModuleSpec of submodules.router; AnyExpertsRouter when it names none
    of the routing methods (megatron's default MoESubmodules router, or None)."""
    from anyexperts.moe.routers.base import SlotRouter

    module = router.module if isinstance(router, ModuleSpec) else router
    if isinstance(module, type) and issubclass(module, (AnyExpertsRouter, SlotRouter)):
        return router
    return AnyExpertsRouter


class AnyExpertsMoELayer(BaseMoELayer):
    """megatron-core MoE layer with importance-driven variable slots (see module docstring)."""

    def __init__(self, config: TransformerConfig, submodules: Optional[MoESubmodules] = None,
                 layer_number: Optional[int] = None, pg_collection=None, *,
                 anyexperts_config: Optional[AnyExpertsConfig] = None,
                 rebalance_config: Optional[RebalanceConfig] = None) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, layer_number=layer_number, pg_collection=pg_collection)
        self.ae = anyexperts_config if anyexperts_config is not None else AnyExpertsConfig()
        self.ae.validate(num_experts=config.num_moe_experts)
        if self.use_shared_expert:
            raise ValueError("moe_shared_expert_intermediate_size: shared experts are not supported by AnyExperts")
        if getattr(config, "moe_latent_size", None):
            raise ValueError("moe_latent_size: MoE latent projections are not supported by AnyExperts")
        splits_sequence = config.sequence_parallel or config.context_parallel_size > 1
        if self.ae.k_rounding in POSITIONAL_ROUNDINGS and splits_sequence:
            # The dither's positions s would then be local to a shard of the sequence.
            raise ValueError(f"k_rounding: {self.ae.k_rounding!r} needs whole sequences on each rank (positions s), "
                             "but sequence_parallel / context_parallel_size > 1 split them; use 'fractional'")
        if submodules is None or submodules.experts is None:
            raise ValueError("submodules.experts: an expert module spec is required (see specs.py)")
        self.submodules = submodules
        self.pg_collection = pg_collection
        ae = self.ae
        num_experts = config.num_moe_experts

        self.aux_losses = AuxLossTerms(ae, num_experts=num_experts, scope_group=getattr(pg_collection, "tp_cp", None),
                                       data_group=getattr(pg_collection, "tp_dp_cp", None),
                                       per_token_loss=config.calculate_per_token_loss)
        router_spec = _router_spec(submodules.router)
        router_module = router_spec.module if isinstance(router_spec, ModuleSpec) else router_spec
        self.importance = None
        if router_module.uses_importance:
            self.importance = ImportancePredictor(hidden_size=config.hidden_size,
                                                  importance_hidden_size=ae.importance_hidden_size,
                                                  init_method=config.init_method, params_dtype=config.params_dtype,
                                                  budget_bias_rate=ae.budget_bias_rate if ae.k_max > ae.k_min else 0.0,
                                                  budget_target=ae.budget_target,
                                                  logit_std=ae.importance_logit_std,
                                                  scale_coeff=ae.importance_scale_coeff)
            if not (self.learns_allocation or self.uses_fusion or self.aux_losses.uses_budget):
                # w then only sets K and capacity order (no gradient path): keep DDP from waiting for grads.
                self.importance.requires_grad_(False)
        self.router = build_module(router_spec, config=config, pg_collection=pg_collection, anyexperts_config=ae)
        self.experts = build_module(submodules.experts, self.num_local_experts, config, pg_collection=pg_collection)
        ep_group = self.ep_group if self.ep_group is not None and self.ep_group.size() > 1 else None
        if rebalance_config is not None:
            rebalance_config.validate(prefix="moe.rebalance.")
            if rebalance_config.enable and not hasattr(self.experts, "forward_with_borrowed"):
                raise ValueError(f"moe.rebalance.enable=True needs an expert module that computes with borrowed "
                                 f"weights (GroupedExperts), not {type(self.experts).__name__}")
        self.token_dispatcher = VariableSlotAllToAll(num_experts=num_experts, ep_group=ep_group,
                                                     rebalance=rebalance_config)
        self.virtual_experts = VirtualExperts(kind=ae.virtual_kind, num_virtual_experts=ae.num_virtual_experts,
                                              num_experts=num_experts, hidden_size=config.hidden_size,
                                              init_method=config.init_method, params_dtype=config.params_dtype)
        if ae.learn_alpha:
            self.alpha = nn.Parameter(torch.full((1,), float(ae.alpha), dtype=config.params_dtype))
        else:
            self.register_buffer("alpha", torch.full((1,), float(ae.alpha), dtype=config.params_dtype), persistent=False)

    @property
    def learns_allocation(self) -> bool:
        return self.ae.k_rounding in LEARNED_ROUNDINGS and self.ae.k_max > self.ae.k_min

    @property
    def computes_importance(self) -> bool:
        """Whether forward runs the importance predictor: not when nothing reads w (one K for
        every token, no fusion, budget or capacity order), as at the reduction to top-k."""
        ae = self.ae
        return self.importance is not None and (
            ae.k_max > ae.k_min or self.uses_fusion or self.aux_losses.uses_budget or ae.capacity_factor is not None)

    @property
    def uses_fusion(self) -> bool:
        return self.ae.learn_alpha or self.ae.alpha != 0.0

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs):
        """hidden_states [S, B, H] (or [T, H]) -> (output of the same shape, None)."""
        in_shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, in_shape[-1])
        ae, num_experts = self.ae, self.config.num_moe_experts

        info = token_info.current()
        modality_T = info.modality_for(hidden_TH.shape[0], hidden_TH.device) if info is not None else None
        importance_T = self.importance(hidden_TH) if self.computes_importance else None
        # Position s of each row of [S, B, H] (row order s * B + b): the dither and the statistics use it.
        position_T = sequence_positions(in_shape, device=hidden_TH.device)
        allocation_importance_T = importance_T
        if importance_T is not None and not self.training and allocation.shuffle_is_active():
            # Diagnostic: each token gets the kappa of another token.
            allocation_importance_T = importance_T[allocation.shuffle_permutation(
                importance_T.shape[0], layer_number=self.layer_number or 0, device=importance_T.device)]
        routing = self.router(hidden_TH, allocation_importance_T, position_T)
        # Without an importance, a token's total gate decides who is dropped first under capacity.
        priority_T = importance_T if importance_T is not None else routing.gate_TK.detach().sum(-1)
        plan = apply_capacity(routing.real_expert_TK, priority_T, num_experts=num_experts,
                              capacity_factor=ae.capacity_factor)
        tokens_NH, tokens_per_expert, probs_N = self.token_dispatcher.dispatch(hidden_TH, plan.expert_TK,
                                                                               routing.gate_TK)
        expert_out_NH = self._compute_experts(tokens_NH, tokens_per_expert, probs_N)
        y_TH = self.token_dispatcher.combine(expert_out_NH)
        virtual_TH = self.virtual_experts(hidden_TH, routing)
        if virtual_TH is not None:
            y_TH = y_TH + virtual_TH
        if self.uses_fusion:
            y_TH = y_TH + (self.alpha * importance_T).to(hidden_TH.dtype).unsqueeze(-1) * hidden_TH

        aux = None
        if self.training and torch.is_grad_enabled():
            attached = []
            if self.aux_losses.enabled:
                aux = self.aux_losses(logits_TX=routing.logits_TX, real_expert_TK=routing.real_expert_TK,
                                      importance_T=importance_T, num_real_counted_T=routing.num_real_counted_T,
                                      num_slots_T=routing.num_slots_T, token_info=info)
                if aux.attached is not None:
                    attached.append(aux.attached)
            # As AuxLossTerms does: megatron's per-token loss divides every gradient by the token count.
            scale = hidden_TH.shape[0] if self.config.calculate_per_token_loss else 1
            if importance_T is not None and self.importance.scale_loss is not None:
                attached.append(self.importance.scale_loss * scale)
            if routing.router_loss is not None:
                attached.append(routing.router_loss * scale)
            if attached:
                y_TH = MoEAuxLossAutoScaler.apply(y_TH, sum(attached[1:], attached[0]))
            if self.importance is not None and self.importance.controls_budget:
                self.importance.count_for_budget(routing.num_real_counted_T)
        if stats.should_record(self.training) and hidden_TH.shape[0] > 0:
            self._record_stats(importance_T, position_T, routing, plan, aux)
            if modality_T is not None:
                stats.record_by_modality(self.layer_number or 0, modality_T, info.names, routing=routing,
                                         importance_T=importance_T, slot_range=self.router.slot_range)
        if trace.is_active():
            record = dict(layer_number=self.layer_number, k=routing.num_slots_T,
                          expert_ids=routing.entry_TK, virtual_mask=routing.is_virtual_TK,
                          dropped_mask=plan.dropped_TK, gates=routing.gate_TK.float(), num_experts=num_experts)
            if importance_T is not None:
                record["importance"] = importance_T
            if modality_T is not None:
                record["modality"] = modality_T
            trace.append(record)
        return y_TH.view(in_shape), None

    def _compute_experts(self, tokens_NH: torch.Tensor, tokens_per_expert, probs_N: torch.Tensor) -> torch.Tensor:
        plan = self.token_dispatcher.last_plan
        if plan is not None and plan.active:  # the same on every rank: the plan is global
            borrowed = self.token_dispatcher.borrow_weights(self.experts.expert_weights())
            expert_out_NH, expert_bias = self.experts.forward_with_borrowed(tokens_NH, tokens_per_expert, probs_N,
                                                                           borrowed)
        else:
            expert_out_NH, expert_bias = self.experts(tokens_NH, tokens_per_expert, probs_N)
        assert expert_bias is None, "expert modules must add their biases themselves"
        return expert_out_NH

    @torch.no_grad()
    def _record_stats(self, importance_T: Optional[torch.Tensor], position_T: torch.Tensor, routing: Routing,
                      plan: CapacityPlan, aux: Optional[AuxLosses]) -> None:
        layer = self.layer_number if self.layer_number is not None else 0
        min_slots, max_slots = self.router.slot_range
        device = routing.num_slots_T.device
        num_real_T = routing.num_real_T
        # Counts average in float64: exact enough that per-rank means average to the global mean.
        stats.record(layer, "real_experts_per_token", num_real_T.double().mean())
        if routing.num_real_at_eval_T is not None:  # fractional training computes more than evaluation
            stats.record(layer, "real_experts_per_token_at_eval", routing.num_real_at_eval_T.double().mean())
        stats.record_slot_moments(layer, routing.num_slots_T, position_T)
        stats.record(layer, "virtual_experts_per_token", routing.num_virtual_T.double().mean())
        stats.record(layer, "slots_per_token", routing.num_slots_T.double().mean())
        k_histogram = torch.zeros(max_slots - min_slots + 1, dtype=torch.float64, device=device)
        k_histogram.scatter_add_(0, routing.num_slots_T - min_slots,
                                 torch.ones_like(routing.num_slots_T, dtype=torch.float64))
        stats.record(layer, "k_histogram", k_histogram, reduction="sum")
        if importance_T is not None:
            stats.record(layer, "importance_mean", importance_T.mean())
            stats.record(layer, "importance_std", importance_T.std(correction=0))
        for name, value in routing.router_stats.items():
            stats.record(layer, name, value)
        tokens_per_expert = count_per_expert(plan.expert_TK, num_experts=self.config.num_moe_experts)
        stats.record(layer, "tokens_per_expert", tokens_per_expert)
        stats.record(layer, "load_imbalance", tokens_per_expert.max() / tokens_per_expert.mean().clamp(min=1e-12))
        stats.record(layer, "dropped_slots", plan.num_dropped.double(), reduction="sum")
        # On the statistics' device: collect() concatenates every value before its one all-reduce.
        stats.record(layer, "a2a_bytes", torch.tensor(float(self.token_dispatcher.last_bytes_sent),
                                                      dtype=torch.float64, device=device))
        plan = self.token_dispatcher.last_plan
        if plan is not None:
            # Host numbers of the global plan (the same on every rank), kept beside the other sums.
            weight_bytes = float(self.token_dispatcher.last_weight_bytes_sent)
            plan_stats = torch.tensor([plan.imbalance_before, plan.imbalance_after, float(plan.active),
                                       float(plan.num_moved_slots), weight_bytes], dtype=torch.float64)
            plan_stats = plan_stats.to(device, non_blocking=True)
            for name, value in zip(("rank_load_imbalance_before", "rank_load_imbalance_after", "rebalance_active",
                                    "rebalanced_slots", "rebalance_weight_bytes"), plan_stats):
                stats.record(layer, name, value)
        if importance_T is not None and self.importance.scale_loss is not None:
            stats.record(layer, "importance_scale_loss", self.importance.scale_loss.detach())
        if aux is not None:
            for name, value in (("load_balance_loss", aux.load_balance), ("budget_loss", aux.budget),
                                ("z_loss", aux.z)):
                if value is not None:
                    stats.record(layer, name, value)
