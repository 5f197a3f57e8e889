"""The AnyExperts auxiliary losses, their global-batch state, and bias balancing.

Each loss has its coefficient in AnyExpertsConfig (0 switches it off) and is logged per
layer (stats.py names load_balance_loss, budget_loss, z_loss; the logged value is the
term without its coefficient). The layer adds coeff x term to the graph the way megatron
does, with MoEAuxLossAutoScaler on the layer output: the trainer must call
`MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1 / num_microbatches))` so that the aux
gradients are scaled like the main loss.

Terms (T tokens on this rank, E real experts, K_i slots, p = softmax over the real logits):
- load balance over REAL experts only: E * sum_e f_e * P_e, f_e = expert e's share of all
  real slots (selected, before capacity), P_e = mean p_e. The softmax is over the E real
  logits only, so moving router mass to virtual entries cannot lower this term, and with
  V = 0 it is megatron's switch loss. Scope `micro_batch`: f_e over this micro-batch of
  this rank; `global_batch`: f_e summed over the data-parallel ranks (one all-reduce) and
  accumulated over the micro-batches of the step so far ("Demons in the Detail", megatron's
  global_aux_loss), P_e over the local tokens. Each rank's loss is E * sum f_e P_e^rank, so
  after DDP averages the gradients over ranks they equal the gradient of the global-batch
  loss E * sum f_e P_e^global (equal token counts per rank).
- budget: holds the mean real experts per token at `budget_target`, counted as they are
  computed: the real slots the router selected (before capacity), or in fractional training
  the real slots evaluation selects for the same tokens (Routing.num_real_counted_T). With
  R the scope's mean count (no gradient) and span = k_max - k_min, the logged term is
  ((R - budget_target) / span)^2 and the graph holds its linearisation
  2 (R - budget_target) / span * mean_w^rank: a push on every token's w, towards fewer slots
  when the count is over target. R is an integer count, so this is a controller on what is
  computed rather than the gradient of a smooth function of w; it is the gradient of
  (mean_w - w*)^2 when R = k_min + mean_w span - mean virtual (the continuous case).
  With virtual experts (and `budget_on_virtual`), the same push also acts on q_i, the
  router's probability mass on virtual entries: the term is 2 (R - target) / span *
  mean(w_i - K_i q_i / span), so over budget both fewer slots and more virtual slots are
  asked for, and the language-model loss decides, token by token, which costs less.
  `budget_scope` micro_batch: means over this rank's micro-batch; global_batch: over the
  data-parallel ranks and the micro-batches so far, which keeps the global variant exact
  across ranks at the price of one scalar in the all-reduce. Off when k_min == k_max.
  With `budget_target_by_modality` (micro-batch scope), each modality m has its own
  deviation (R_m - t_m) / span, R_m the mean over that modality's tokens of the micro-batch,
  and each token's w is pushed by its own modality's deviation; the logged term is the
  token-weighted mean of the squared deviations. The modalities come from the TokenInfo
  around the forward (token_info.py).
- router z-loss: mean over tokens of logsumexp(all E + V logits)^2 (ST-MoE).

With tensor/context parallel groups larger than 1 (tokens split across tp x cp ranks, as
with sequence parallelism), counts are summed over that group and each rank's P, budget and
z terms are divided by its size, as megatron's router does. Untested here (TP = CP = 1).

Aux-loss-free balancing (DeepSeek-V3): the router counts real slots per expert; after each
optimizer step the trainer calls update_selection_biases(model), which all-reduces the
counts over the data-parallel group and applies b_e += rate * sign(mean load - load_e).

Trainer API:
    reset_global_batch_state(model)   at the start of every global batch (step)
    update_selection_biases(model)    after every optimizer step (selection biases, the budget's
                                      integral controller and the routing methods' budget
                                      controllers; no-op when none is on)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from anyexperts.moe.config import AnyExpertsConfig
from anyexperts.moe.router import count_per_expert


def load_balance_loss(probs_real_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                      num_real_slots: torch.Tensor, *, num_tokens_in_scope: Union[int, torch.Tensor]) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = tokens_per_expert_E / num_real_slots (no gradient) and
    P_e = sum of p_e over these tokens / num_tokens_in_scope."""
    num_experts = probs_real_TE.shape[-1]
    share_E = (tokens_per_expert_E / num_real_slots.clamp(min=1)).detach().to(probs_real_TE.dtype)
    mean_prob_E = probs_real_TE.sum(0) / max(num_tokens_in_scope, 1)  # a rank may hold no tokens
    return num_experts * torch.sum(share_E * mean_prob_E)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def z_loss(logits_TX: torch.Tensor) -> torch.Tensor:
    return torch.square(torch.logsumexp(_at_least_fp32(logits_TX), dim=-1)).sum() / max(logits_TX.shape[0], 1)


@dataclass
class AuxLosses:
    attached: Optional[torch.Tensor]       # sum of coeff x (graph term), what the autoscaler carries
    load_balance: Optional[torch.Tensor]   # logged values (no gradient), None when off
    budget: Optional[torch.Tensor]
    z: Optional[torch.Tensor]


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class AuxLossTerms(nn.Module):
    """Computes the aux losses of one layer; holds its global-batch accumulators (not saved).

    `scope_group` is the tensor x context parallel group (ranks that split one micro-batch's
    tokens); `data_group` the tensor x data x context parallel group (every rank with tokens
    of the global batch). None means a group of one.
    """

    def __init__(self, ae: AnyExpertsConfig, *, num_experts: int, scope_group=None, data_group=None,
                 per_token_loss: bool = False) -> None:
        super().__init__()
        self.ae = ae
        self.num_experts = num_experts
        self.scope_group = scope_group
        self.data_group = data_group
        self.per_token_loss = per_token_loss
        # [E counts, real slots, budget-counted real slots, tokens] summed over ranks and micro-batches.
        self.register_buffer("global_sums", torch.zeros(num_experts + 3, dtype=torch.float64), persistent=False)

    @property
    def uses_budget(self) -> bool:
        ae = self.ae
        has_target = ae.budget_target is not None or bool(ae.budget_target_by_modality)
        return ae.budget_coeff > 0 and has_target and ae.k_max > ae.k_min

    @property
    def enabled(self) -> bool:
        return self.ae.load_balance_coeff > 0 or self.ae.z_loss_coeff > 0 or self.uses_budget

    def reset_global_batch_state(self) -> None:
        self.global_sums.zero_()

    def _apply(self, fn, *args, **kwargs):
        # Keep the accumulators float64 through megatron's Float16Module (.bfloat16()).
        super()._apply(fn, *args, **kwargs)
        self.global_sums.data = self.global_sums.data.double()
        return self

    def _sums(self, real_expert_TK, num_real_counted_T) -> torch.Tensor:
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy (which would sync).
        num_tokens = torch.full((1,), float(real_expert_TK.shape[0]), dtype=torch.float64,
                                device=real_expert_TK.device)
        counts_E = count_per_expert(real_expert_TK, num_experts=self.num_experts, dtype=torch.float64)
        return torch.cat([counts_E, counts_E.sum().view(1), num_real_counted_T.double().sum().view(1), num_tokens])

    def forward(self, *, logits_TX: torch.Tensor, real_expert_TK: torch.Tensor, importance_T: Optional[torch.Tensor],
                num_real_counted_T: torch.Tensor, num_slots_T: Optional[torch.Tensor] = None,
                token_info=None) -> AuxLosses:
        """importance_T may be None only without the budget term (a router with no importance)."""
        ae, num_experts = self.ae, self.num_experts
        num_local_tokens = real_expert_TK.shape[0]
        scope_size = _group_size(self.scope_group)
        with torch.no_grad():
            local_sums = self._sums(real_expert_TK, num_real_counted_T)
            micro_sums = local_sums
            if scope_size > 1:
                micro_sums = local_sums.clone()
                dist.all_reduce(micro_sums, group=self.scope_group)
            needs_global = ((ae.load_balance_coeff > 0 and ae.load_balance_scope == "global_batch")
                            or (self.uses_budget and ae.budget_scope == "global_batch"))
            if needs_global:
                step_sums = local_sums.clone()
                if _group_size(self.data_group) > 1:
                    dist.all_reduce(step_sums, group=self.data_group)
                self.global_sums += step_sums

        terms, logged = [], {}
        if ae.load_balance_coeff > 0:
            sums = self.global_sums if ae.load_balance_scope == "global_batch" else micro_sums
            probs_real_TE = torch.softmax(_at_least_fp32(logits_TX[:, :num_experts]), dim=-1)
            value = load_balance_loss(probs_real_TE, sums[:num_experts], sums[num_experts],
                                      num_tokens_in_scope=num_local_tokens * scope_size)
            terms.append(ae.load_balance_coeff * value)
            logged["load_balance"] = value.detach() * scope_size
        if self.uses_budget:
            sums = self.global_sums if ae.budget_scope == "global_batch" else micro_sums
            num_tokens = sums[num_experts + 2].clamp(min=1)
            dtype = importance_T.dtype  # float32, or float64 in float64 models
            span = ae.k_max - ae.k_min
            pressure_T = importance_T
            num_virtual = logits_TX.shape[-1] - num_experts
            if ae.budget_on_virtual and num_virtual > 0 and ae.rho_max > 0 and num_slots_T is not None:
                # The second way to cut real compute: more of the token's K slots virtual. q_i, the
                # router's virtual mass (softmax over E + V), moves the real count by -K_i q_i.
                virtual_mass_T = torch.softmax(_at_least_fp32(logits_TX), dim=-1)[:, num_experts:].sum(-1)
                pressure_T = importance_T - virtual_mass_T.to(dtype) * num_slots_T.to(dtype) / span
            if ae.budget_target_by_modality:
                term, logged["budget"] = self._budget_by_modality(token_info, num_real_counted_T, pressure_T,
                                                                  scope_size)
                terms.append(ae.budget_coeff * term)
            else:
                mean_real = (sums[num_experts + 1] / num_tokens).to(dtype)
                deviation = (mean_real - ae.budget_target) / span
                local_mean_pressure = pressure_T.sum() / max(num_local_tokens * scope_size, 1)
                terms.append(ae.budget_coeff * 2.0 * deviation * local_mean_pressure)
                logged["budget"] = deviation.square()
        if ae.z_loss_coeff > 0:
            value = z_loss(logits_TX) / scope_size
            terms.append(ae.z_loss_coeff * value)
            logged["z"] = value.detach() * scope_size
        attached = None
        if terms:
            attached = sum(terms[1:], terms[0])
            if self.per_token_loss:
                # megatron's calculate_per_token_loss divides all gradients by the token count later.
                attached = attached * num_local_tokens
        return AuxLosses(attached=attached, load_balance=logged.get("load_balance"), budget=logged.get("budget"),
                         z=logged.get("z"))


    def _budget_by_modality(self, info, num_real_counted_T: torch.Tensor, pressure_T: torch.Tensor,
                            scope_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(graph term, logged term) of the micro-batch budget with a target per modality: the
        same linearised push as the single budget, each token's from its own modality's deviation
        (R_m - t_m) / span; logged: the token-weighted mean of the squared deviations."""
        ae = self.ae
        if info is None:
            raise ValueError("budget_target_by_modality needs the modality of every token, but this training "
                             "forward has none: set it with anyexperts.moe.token_info.use(...) or attach(...)")
        span = ae.k_max - ae.k_min
        num_tokens = num_real_counted_T.shape[0]
        modality_T = info.modality_for(num_tokens, pressure_T.device)
        fallback = math.nan if ae.budget_target is None else float(ae.budget_target)
        targets_M = torch.tensor([float(ae.budget_target_by_modality.get(name, fallback)) for name in info.names],
                                 dtype=torch.float64, device=pressure_T.device)
        with torch.no_grad():
            one_hot_TM = torch.nn.functional.one_hot(modality_T, len(info.names)).to(torch.float64)
            sums_2M = torch.stack([one_hot_TM.sum(0), num_real_counted_T.double() @ one_hot_TM])
            if scope_size > 1:
                dist.all_reduce(sums_2M, group=self.scope_group)
            mean_real_M = sums_2M[1] / sums_2M[0].clamp(min=1)
            # Modalities without a target (NaN) or without tokens push nothing.
            deviation_M = torch.where(torch.isfinite(targets_M) & (sums_2M[0] > 0),
                                      (mean_real_M - targets_M) / span, torch.zeros_like(mean_real_M))
            logged = (deviation_M.square() * sums_2M[0]).sum() / sums_2M[0].sum().clamp(min=1)
        deviation_T = deviation_M[modality_T].to(pressure_T.dtype)
        term = 2.0 * (deviation_T * pressure_T).sum() / max(num_tokens * scope_size, 1)
        return term, logged.to(pressure_T.dtype)


# ------------------------------------------------------------------------------------
# Trainer API

def _modules(model) -> Iterable[nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        yield from chunk.modules()


def reset_global_batch_state(model) -> None:
    """Zeroes every AnyExperts layer's global-batch accumulators; call before each step's
    first micro-batch (model: a module or a list of megatron model chunks)."""
    for module in _modules(model):
        if isinstance(module, AuxLossTerms):
            module.reset_global_batch_state()


@torch.no_grad()
def update_selection_biases(model, group=None) -> None:
    """The after-step controller updates, each with one all-reduce over `group` (default: the
    tensor x data x context parallel group of megatron's parallel_state), then zeroes their
    counts:
    - DeepSeek-V3 bias of every router with bias_update_rate > 0:
      b_e += rate * sign(mean load - load_e);
    - virtual selection bias of every router with a virtual_target:
      b_v -= virtual_bias_rate * (virtual slots per token - virtual_target);
    - importance logit offset of every layer with budget_bias_rate > 0 (importance.py):
      offset -= rate * (R - budget_target), R the step's mean counted real slots per token;
    - running mean and std of the importance logit (importance_logit_std set);
    - every active budget controller of a routing method (routers/budget.py: top-p's p,
      ReMoE's L1 coefficient).
    Every rank holds the same layers, so every rank issues the same collectives."""
    from anyexperts.moe.importance import ImportancePredictor
    from anyexperts.moe.router import AnyExpertsRouter
    from anyexperts.moe.routers.budget import RealExpertsController, update_count_controllers

    routers = [m for m in _modules(model) if isinstance(m, AnyExpertsRouter) and m.bias_balancing]
    virtual_routers = [m for m in _modules(model) if isinstance(m, AnyExpertsRouter) and m.controls_virtual]
    predictors = [m for m in _modules(model) if isinstance(m, ImportancePredictor)
                  and (m.controls_budget or m.normalizes_logit)]
    controllers = [m for m in _modules(model) if isinstance(m, RealExpertsController) and m.is_active]
    if not routers and not virtual_routers and not predictors and not controllers:
        return
    if group is None and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    if routers:
        loads_LE = torch.stack([r.bias_tokens_per_expert for r in routers])
        if _group_size(group) > 1:
            dist.all_reduce(loads_LE, group=group)
        offset_LE = loads_LE.mean(dim=-1, keepdim=True) - loads_LE
        for router, offset_E in zip(routers, offset_LE):
            router.selection_bias += router.ae.bias_update_rate * torch.sign(offset_E)
            router.bias_tokens_per_expert.zero_()
    if virtual_routers:
        counts_L2 = torch.stack([r.virtual_counts for r in virtual_routers])
        if _group_size(group) > 1:
            dist.all_reduce(counts_L2, group=group)
        for router, counts_2 in zip(virtual_routers, counts_L2):
            router.update_virtual_bias(counts_2)
    if predictors:
        # One all-reduce for every layer: [counted real slots, tokens, logit moments (3)].
        counts_L5 = torch.stack([torch.cat([p.budget_counts, p.logit_moments]) for p in predictors])
        if _group_size(group) > 1:
            dist.all_reduce(counts_L5, group=group)
        for predictor, (counted, num_tokens, *moments) in zip(predictors, counts_L5):
            if predictor.normalizes_logit:
                predictor.update_logit_statistics(torch.stack(moments))
            if not predictor.controls_budget:
                continue
            # No host sync; a step without training forwards leaves the offset alone.
            error = torch.where(num_tokens > 0, counted / num_tokens.clamp(min=1) - predictor.budget_target,
                                torch.zeros_like(counted))
            predictor.logit_offset -= (predictor.budget_bias_rate * error).float()
            predictor.budget_counts.zero_()
    update_count_controllers(controllers, group=group if _group_size(group) > 1 else None)
