"""Step 2 of the AnyExperts layer: slots per token, real + virtual selection, gates.

    router = AnyExpertsRouter(config, anyexperts_config=ae_cfg)   # config: TransformerConfig
    routing = router(hidden_TH, importance_T, position_T=sequence_positions(hidden_SBH.shape))
    routing.real_expert_TK   # int64 [T, k_max]: global real expert per slot, -1 elsewhere
    routing.gate_TK          # [T, k_max] gates (0 on unused slots)

One linear layer gives logits over the E real experts and the V virtual ones (rows E..E+V-1
of the weight; AdaMoE's "null experts"). Each token i gets K_i slots from its importance
(allocation.py: round, dither, or the learned fractional / straight-through slot), and the
router takes the top K_i entries with at most floor(rho_max * K_i) virtual ones: a virtual
entry ranked past that cap is skipped and the next-best entry takes its place, so the
excess is filled by real experts. position_T (`sequence_positions`) is needed only by the
positional roundings (dither, straight_through); the dither depends on s only, not on the
batch index, so splitting the batch across ranks or micro-batches leaves every K unchanged.

Vectorised, no loop over tokens: one `topk` over k_max + V candidates (enough: at most V
candidates are ever skipped), then a cumulative count of virtual candidates decides which
are allowed, and a cumulative count of allowed ones decides which fit in K_i. Slot order
is rank order, so with V = 0 and k_min = k_max = k this is torch.topk(logits, k) exactly
as megatron's TopKRouter does it.

Gates are exp(logit - logsumexp over the normalisation set): over every selected entry
(gate_norm="all", virtual entries dilute the real output) or over the selected real ones
only (gate_norm="real": real gates sum to 1 and a virtual gate comes on top, as its share
of the selected real entries and itself, sigmoid(l_v - logsumexp(real)), so it stays
below 1: an unbounded exp(l_v - logsumexp(real)) lets a copy or constant expert's output
grow without limit). This equals megatron's softmax over the top-k logits.
In the learned allocations the last slot's gate is scaled by its mass (compute_gates).

Aux-loss-free balancing (DeepSeek-V3): a per-expert `selection_bias` is added to the real
logits for the selection only, never to the gates; losses.update_selection_biases() moves
it after each optimizer step from the loads counted here in `bias_tokens_per_expert`.
The virtual entries get one such bias, `virtual_bias` (virtual_target): it holds how many
virtual slots are taken per token, while the ranking of the virtual logits against the
real ones, which the loss trains through the gates, decides which tokens take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe.allocation import allocate_slots
from anyexperts.moe.allocation import dithered_num_slots, num_slots_from_importance  # noqa: F401 (re-exported)
from anyexperts.moe.config import AnyExpertsConfig


@dataclass
class Routing:
    """Everything the router decided for T tokens (K = k_max slot columns)."""

    logits_TX: torch.Tensor          # router logits over E real + V virtual entries
    num_slots_T: torch.Tensor        # int64 K_i
    entry_TK: torch.Tensor           # int64 selected entry ids in rank order, -1 on unused slots
    gate_TK: torch.Tensor            # gates, 0 on unused slots
    is_virtual_TK: torch.Tensor      # bool
    real_expert_TK: torch.Tensor     # int64 entry id on real slots, -1 on virtual/unused ones
    # Real slots per token the budget counts: those evaluation selects (allocation.py); equal to
    # num_real_T except in fractional training, which computes up to one more.
    num_real_at_eval_T: Optional[torch.Tensor] = None
    # A routing method's own regulariser, coefficient included (top-p's entropy, ReMoE's L1):
    # the layer attaches it with its aux losses. None: the method has none.
    router_loss: Optional[torch.Tensor] = None
    # Per-layer scalars the method logs beside the layer's statistics (stats.py), no gradient.
    router_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_real_T(self) -> torch.Tensor:
        return (self.real_expert_TK >= 0).sum(-1)

    @property
    def num_virtual_T(self) -> torch.Tensor:
        return self.is_virtual_TK.sum(-1)

    @property
    def num_real_counted_T(self) -> torch.Tensor:
        return self.num_real_T if self.num_real_at_eval_T is None else self.num_real_at_eval_T


def sequence_positions(shape: Sequence[int], *, device=None) -> torch.Tensor:
    """int64 [T]: position along the sequence of each row of hidden states of `shape`, flattened.

    [S, B, H] (megatron's layout) flattens in [s * B + b] order, so position = row // B;
    [T, H] is taken as one sequence of T tokens. Sequence and context parallelism would make
    S a slice of the sequence; the layer refuses the dither with them.
    """
    num_tokens = math.prod(shape[:-1])
    num_sequences = shape[1] if len(shape) == 3 else 1
    return torch.arange(num_tokens, device=device) // num_sequences


def count_per_expert(expert_TK: torch.Tensor, *, num_experts: int, dtype=torch.float32) -> torch.Tensor:
    """Slots per expert [E] of an id tensor with -1 for "no expert"; no host sync (no bincount)."""
    shifted_N = (expert_TK.reshape(-1) + 1).clamp(min=0)
    counts = torch.zeros(num_experts + 1, dtype=dtype, device=expert_TK.device)
    counts.scatter_add_(0, shifted_N, torch.ones_like(shifted_N, dtype=dtype))
    return counts[1:]


def max_virtual_table(*, rho_max: float, k_max: int, device=None) -> torch.Tensor:
    """int64 [k_max + 1]: entry K is floor(rho_max * K), as AnyExpertsConfig.validate computes it."""
    return torch.tensor([math.floor(rho_max * k) for k in range(k_max + 1)], dtype=torch.int64, device=device)


def select_slots(selection_scores_TX: torch.Tensor, num_slots_T: torch.Tensor, max_virtual_T: torch.Tensor,
                 *, num_experts: int, k_max: int) -> torch.Tensor:
    """Entry ids [T, k_max] (int64, rank order, -1 past K_i) of the top K_i entries with at
    most max_virtual_T[i] virtual ones (ids >= num_experts).

    Needs at least K_i - max_virtual_T[i] real entries (AnyExpertsConfig.validate checks it).
    """
    num_tokens, num_entries = selection_scores_TX.shape
    num_virtual = num_entries - num_experts
    num_candidates = min(num_entries, k_max + num_virtual)
    _, candidate_TC = selection_scores_TX.topk(num_candidates, dim=-1, sorted=True)
    is_virtual_TC = candidate_TC >= num_experts
    if num_virtual > 0:
        # The j-th virtual candidate (1-based) is allowed while j <= the token's cap.
        allowed_TC = ~is_virtual_TC | (is_virtual_TC.cumsum(-1) <= max_virtual_T.unsqueeze(-1))
    else:
        allowed_TC = torch.ones_like(is_virtual_TC)
    accepted_rank_TC = allowed_TC.cumsum(-1)  # 1-based slot of an allowed candidate
    selected_TC = allowed_TC & (accepted_rank_TC <= num_slots_T.unsqueeze(-1))
    # Unselected candidates go to a spare column k_max that is cut off afterwards.
    slot_TC = torch.where(selected_TC, accepted_rank_TC - 1, torch.full_like(accepted_rank_TC, k_max))
    value_TC = torch.where(selected_TC, candidate_TC, torch.full_like(candidate_TC, -1))
    entry_TK = torch.full((num_tokens, k_max + 1), -1, dtype=torch.int64, device=candidate_TC.device)
    entry_TK.scatter_(1, slot_TC, value_TC)
    return entry_TK[:, :k_max].contiguous()


def compute_gates(logits_TX: torch.Tensor, entry_TK: torch.Tensor, *, num_experts: int, gate_norm: str,
                  last_slot_mass_T: Optional[torch.Tensor] = None,
                  num_slots_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gate = exp(logit - logsumexp(logits of the normalisation set)); 0 on unused slots.

    With last_slot_mass_T (the learned allocations, allocation.py), slot K_i - 1 weighs m_i:
    gate_j = m_j exp(l_j) / max(sum over the normalisation set of m exp(l), max exp(l)), m = 1
    on the other slots. The max keeps a lone normalised slot of mass m at gate m instead of 1
    (slots are in rank order, so only a lone one can be outweighed), and the output moves
    continuously from K - 1 whole slots (m -> 0) to K (m = 1). All masses 1 is the plain softmax.
    """
    is_used_TK = entry_TK >= 0
    logit_TK = logits_TX.gather(1, entry_TK.clamp(min=0))
    if gate_norm == "real":
        in_norm_TK = is_used_TK & (entry_TK < num_experts)
    else:
        in_norm_TK = is_used_TK
    masked_TK = logit_TK.masked_fill(~in_norm_TK, float("-inf"))
    # gate_norm="real": a virtual entry's own weight joins its denominator (at most 1).
    on_top_TK = is_used_TK & ~in_norm_TK
    if last_slot_mass_T is None:
        log_norm_T = torch.logsumexp(masked_TK, dim=-1, keepdim=True)
        gate_TK = torch.exp(logit_TK - log_norm_T)
        if gate_norm == "real":
            gate_TK = torch.where(on_top_TK, torch.sigmoid(logit_TK - log_norm_T), gate_TK)
        return gate_TK.masked_fill(~is_used_TK, 0.0)
    is_last_TK = torch.arange(entry_TK.shape[1], device=entry_TK.device) == (num_slots_T - 1).unsqueeze(-1)
    mass_TK = torch.where(is_last_TK, last_slot_mass_T.to(logit_TK.dtype).unsqueeze(-1),
                          torch.ones_like(logit_TK))
    # Not detached: the shift must follow the lone-slot case exactly (gate m, no logit gradient).
    shift_T1 = masked_TK.max(dim=-1, keepdim=True).values
    weight_TK = (mass_TK * torch.exp(logit_TK - shift_T1)).masked_fill(~is_used_TK, 0.0)
    norm_T1 = weight_TK.masked_fill(~in_norm_TK, 0.0).sum(-1, keepdim=True).clamp(min=1.0)
    return weight_TK / torch.where(on_top_TK, norm_T1 + weight_TK, norm_T1)


def router_logits(router: Router, hidden_TH: torch.Tensor) -> torch.Tensor:
    """router.gating over the rows of hidden_TH ([T, H] or [S, B, H]), [T, rows of the weight]."""
    hidden_TH = hidden_TH.reshape(-1, hidden_TH.shape[-1])
    if hidden_TH.shape[0] == 0:
        # megatron's router_gating_linear cannot view an empty output; no tokens, no logits.
        return hidden_TH.new_zeros((0, router.weight.shape[0])) + router.weight.sum() * 0
    return router.gating(hidden_TH)


def virtual_straight_through_mass(logits_TX: torch.Tensor, entry_TK: torch.Tensor, num_slots_T: torch.Tensor,
                                  max_virtual_T: torch.Tensor, last_slot_mass_T: Optional[torch.Tensor], *,
                                  num_experts: int) -> torch.Tensor:
    """Mass of slot K_i - 1 with the virtual decision's straight-through gradient (learn_virtual).

    Where a token may hold a virtual slot but chose none, its last slot is the real expert a
    virtual one would displace. That slot keeps weight 1 in the forward, times
    1 - (pi - stop_grad(pi)) with pi = sigmoid(best virtual logit - that expert's logit): the
    loss then tells the virtual logit whether the last real expert was worth it (it helped:
    the virtual logit falls; it hurt: it rises). Tokens that chose a virtual slot give no such
    gradient (the expert they skipped was not computed), as tokens rounded down do for w.
    """
    num_tokens = entry_TK.shape[0]
    rows_T = torch.arange(num_tokens, device=entry_TK.device)
    last_entry_T = entry_TK[rows_T, (num_slots_T - 1).clamp(min=0)]
    eligible_T = (max_virtual_T >= 1) & ~(entry_TK >= num_experts).any(-1) & (last_entry_T >= 0)
    best_virtual_T = logits_TX[:, num_experts:].max(dim=-1).values
    last_logit_T = logits_TX.gather(1, last_entry_T.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    pi_T = torch.sigmoid(best_virtual_T - last_logit_T)
    factor_T = torch.where(eligible_T, 1.0 - (pi_T - pi_T.detach()), torch.ones_like(pi_T))
    return factor_T if last_slot_mass_T is None else last_slot_mass_T.to(factor_T.dtype) * factor_T


class AnyExpertsRouter(Router):
    """Logits over E + V entries, variable-K selection with a virtual cap, gates.

    A megatron-core `Router` (so `weight` is a float32-created parameter initialised by
    config.init_method and marked sequence_parallel like megatron's router), with
    E + V rows instead of E.
    """

    uses_importance = True

    def __init__(self, config: TransformerConfig, pg_collection=None, *,
                 anyexperts_config: AnyExpertsConfig) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        self.ae = anyexperts_config
        self.num_virtual_experts = anyexperts_config.num_virtual_experts
        num_entries = self.num_experts + self.num_virtual_experts
        self.weight = torch.nn.Parameter(torch.empty((num_entries, config.hidden_size), dtype=torch.float32))
        if self.bias is not None:
            self.bias = torch.nn.Parameter(torch.empty((num_entries,), dtype=torch.float32))
        self.reset_parameters()
        self.register_buffer("max_virtual_by_k", max_virtual_table(rho_max=self.ae.rho_max, k_max=self.ae.k_max),
                             persistent=False)
        # Selection-only bias of the real entries (aux-loss-free balancing); saved with the model.
        self.register_buffer("selection_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Real slots per expert since the last bias update (this rank's tokens).
        self.register_buffer("bias_tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)
        if self.controls_virtual:
            # Selection-only bias of the virtual entries, the integral controller of virtual_target;
            # registered only when it is on, so checkpoints without it load unchanged.
            self.register_buffer("virtual_bias", torch.zeros(1, dtype=torch.float32))
            # [virtual slots, tokens] of this rank's training forwards since the last update.
            self.register_buffer("virtual_counts", torch.zeros(2, dtype=torch.float64), persistent=False)

    @property
    def slot_range(self) -> tuple[int, int]:
        """The range of Routing.num_slots_T."""
        return self.ae.k_min, self.ae.k_max

    @property
    def bias_balancing(self) -> bool:
        return self.ae.bias_update_rate > 0

    @property
    def controls_virtual(self) -> bool:
        return self.ae.virtual_target is not None and self.ae.holds_virtual_slots

    def route(self, logits_TX: torch.Tensor, importance_T: Optional[torch.Tensor],
              position_T: Optional[torch.Tensor] = None) -> Routing:
        """The routing decision for given logits and importance (no parameters involved);
        position_T (sequence_positions) is required with the positional k_roundings, importance_T
        unless k_min == k_max."""
        ae = self.ae
        allocation = allocate_slots(importance_T, position_T, ae, training=self.training,
                                    num_tokens=logits_TX.shape[0], device=logits_TX.device)
        num_slots_T = allocation.num_slots_T
        max_virtual_by_k = self.max_virtual_by_k.to(num_slots_T.device)
        num_real_at_eval_T = None
        with torch.no_grad():
            scores_TX = logits_TX.detach()
            if self.bias_balancing or self.controls_virtual:
                real_bias_E = self.selection_bias if self.bias_balancing else self.selection_bias.new_zeros(
                    self.num_experts)
                virtual_bias_V = (self.virtual_bias.expand(self.num_virtual_experts) if self.controls_virtual
                                  else self.selection_bias.new_zeros(self.num_virtual_experts))
                bias_X = torch.cat([real_bias_E, virtual_bias_V])
                scores_TX = scores_TX + bias_X  # float32 bias: promotes bf16 logits, keeps float64 ones
            entry_TK = select_slots(scores_TX, num_slots_T, max_virtual_by_k[num_slots_T],
                                    num_experts=self.num_experts, k_max=ae.k_max)
            if allocation.num_slots_at_eval_T is not None:
                # What evaluation would select for these tokens: the count the budget holds.
                at_eval_T = allocation.num_slots_at_eval_T
                entry_at_eval_TK = select_slots(scores_TX, at_eval_T, max_virtual_by_k[at_eval_T],
                                                num_experts=self.num_experts, k_max=ae.k_max)
                num_real_at_eval_T = ((entry_at_eval_TK >= 0) & (entry_at_eval_TK < self.num_experts)).sum(-1)
        last_slot_mass_T = allocation.last_slot_mass_T
        if ae.learn_virtual and self.training and self.num_virtual_experts > 0:
            last_slot_mass_T = virtual_straight_through_mass(
                logits_TX, entry_TK, num_slots_T, max_virtual_by_k[num_slots_T], last_slot_mass_T,
                num_experts=self.num_experts)
        gate_TK = compute_gates(logits_TX, entry_TK, num_experts=self.num_experts, gate_norm=ae.gate_norm,
                                last_slot_mass_T=last_slot_mass_T, num_slots_T=num_slots_T)
        is_virtual_TK = entry_TK >= self.num_experts
        real_expert_TK = entry_TK.masked_fill(is_virtual_TK, -1)
        return Routing(logits_TX=logits_TX, num_slots_T=num_slots_T, entry_TK=entry_TK, gate_TK=gate_TK,
                       is_virtual_TK=is_virtual_TK, real_expert_TK=real_expert_TK,
                       num_real_at_eval_T=num_real_at_eval_T)

    def routing(self, logits: torch.Tensor):  # megatron's abstract hook; the importance is needed too
        raise NotImplementedError("AnyExpertsRouter routes with route(logits_TX, importance_T, position_T)")

    def forward(self, hidden_TH: torch.Tensor, importance_T: Optional[torch.Tensor],
                position_T: Optional[torch.Tensor] = None) -> Routing:
        routing = self.route(router_logits(self, hidden_TH), importance_T, position_T)
        if self.training and torch.is_grad_enabled():
            if self.bias_balancing:
                self.count_for_bias_update(routing.real_expert_TK)
            if self.controls_virtual:
                self.count_virtual(routing.num_virtual_T)
        return routing

    @torch.no_grad()
    def count_virtual(self, num_virtual_T: torch.Tensor) -> None:
        self.virtual_counts += torch.stack([num_virtual_T.double().sum(),
                                            torch.full((), float(num_virtual_T.numel()), dtype=torch.float64,
                                                       device=num_virtual_T.device)])

    @torch.no_grad()
    def update_virtual_bias(self, counts_2: torch.Tensor) -> None:
        """virtual_bias -= rate * (virtual slots per token - virtual_target), from the step's
        [virtual slots, tokens] summed over ranks; a step without training forwards keeps it."""
        num_virtual, num_tokens = counts_2.unbind()
        error = torch.where(num_tokens > 0, num_virtual / num_tokens.clamp(min=1) - self.ae.virtual_target,
                            torch.zeros_like(num_virtual))
        self.virtual_bias -= (self.ae.virtual_bias_rate * error).float()
        self.virtual_counts.zero_()

    @torch.no_grad()
    def count_for_bias_update(self, real_expert_TK: torch.Tensor) -> None:
        self.bias_tokens_per_expert += count_per_expert(real_expert_TK, num_experts=self.num_experts)

    def _apply(self, fn, *args, **kwargs):
        # megatron's Float16Module calls .bfloat16() on the model: the bias and the load counts
        # must stay float32 (a bf16 count is exact only to 256, a bf16 bias swallows small steps).
        super()._apply(fn, *args, **kwargs)
        self.selection_bias.data = self.selection_bias.data.float()
        self.bias_tokens_per_expert.data = self.bias_tokens_per_expert.data.float()
        if self.controls_virtual:
            self.virtual_bias.data = self.virtual_bias.data.float()
            self.virtual_counts.data = self.virtual_counts.data.double()
        return self
