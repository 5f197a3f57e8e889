"""Expert parallelism: the AnyExperts layer at EP = 2 and EP = 4 equals one process.

    OMP_NUM_THREADS=1 python -m pytest tests/test_anyexperts_distributed.py -q

Each world (2 and 4 gloo ranks, expert_parallel_size = world, so data-parallel = world
too) is spawned once. Every rank builds, from the same seed, a one-process reference
layer on singleton process groups (the full batch, all experts) and the expert-parallel
layer on parallel_state's groups (its slice of the experts: the reference's weights
copied, expert weights sliced by EP rank). The input is CHUNKED by rank: rank r gets
tokens [r T, (r+1) T) of the global batch. Gradients are reduced the way megatron DDP
does it: non-expert gradients averaged over the data-parallel ranks, expert gradients
scaled by 1 / data-parallel size (megatron's expert_gradient_scaling_factor; the
expert-data-parallel group has one rank here). Each rank's main loss is the mean over
its tokens of <out, R> for a fixed random R.

The global case runs the learned fractional allocation, the micro case the straight-through one.
What "the same" means per aux-loss scope:
- global_batch (load balance and budget): f_e and the budget's mean importance are
  all-reduced over the data-parallel ranks, so one EP step must equal ONE reference pass
  over the whole global batch.
- micro_batch (and the capacity limit, decided locally per rank): each rank's losses see
  only its own tokens, so one EP step must equal the reference run over the N chunks as
  N micro-batches with gradient accumulation (main loss / N, aux loss scale 1 / N through
  MoEAuxLossAutoScaler.set_loss_scale, as the trainer does).
Compared: outputs, logged losses and statistics (stats.collect over the world against
the reference's), every gradient (importance MLP, router, virtual experts, alpha, input,
experts against the matching slice), and the bias-balancing update. float64 throughout;
tolerance 1e-9 relative to each tensor's scale (observed differences are ~1e-15).
The micro-batch case runs megatron's SequentialMLP as the expert module, the global case
the project's GroupedExperts.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_anyexperts_layer import build_layer, rel_diff, transformer_config

pytestmark = pytest.mark.slow

TOKENS_PER_RANK, HIDDEN, NUM_EXPERTS = 12, 16, 8
CASES = ("global", "micro")


def _ae_config(case: str):
    from anyexperts import AnyExpertsConfig

    if case == "global":
        return AnyExpertsConfig(k_min=1, k_max=4, k_rounding="fractional", num_virtual_experts=2, rho_max=0.5,
                                virtual_kind="constant",
                                gate_norm="real", alpha=0.2, learn_alpha=True, load_balance_coeff=0.1,
                                load_balance_scope="global_batch", budget_coeff=0.5, budget_target=2.05,
                                budget_scope="global_batch", z_loss_coeff=0.01, bias_update_rate=0.05,
                                budget_bias_rate=0.3)
    # straight_through needs positions: each micro-batch of the reference has the EP chunk's shape.
    return AnyExpertsConfig(k_min=2, k_max=4, k_rounding="straight_through", num_virtual_experts=1, rho_max=0.34,
                            virtual_kind="copy",
                            gate_norm="all", alpha=0.2, load_balance_coeff=0.1, budget_coeff=0.5, budget_target=2.95,
                            budget_bias_rate=0.3, importance_logit_std=2.0, virtual_target=0.4, virtual_bias_rate=0.5,
                            z_loss_coeff=0.01, capacity_factor=1.0)


def _singleton_pg_collection(rank: int, world_size: int):
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    pgs = ProcessGroupCollection()
    for name in ("tp", "cp", "tp_cp", "tp_dp_cp", "dp", "dp_cp", "ep", "expt_tp", "expt_dp", "tp_ep", "pp"):
        setattr(pgs, name, groups[rank])
    return pgs


_SEQUENTIAL = re.compile(r"experts\.local_experts\.(\d+)\.(.*)")


def _reference_name_and_slice(name: str, num_local: int, ep_rank: int):
    """The reference parameter an EP parameter comes from, and the rows it takes."""
    match = _SEQUENTIAL.fullmatch(name)
    if match:
        return f"experts.local_experts.{ep_rank * num_local + int(match.group(1))}.{match.group(2)}", None
    if name.startswith("experts."):  # GroupedExperts: stacked [E_local, ...]
        return name, slice(ep_rank * num_local, (ep_rank + 1) * num_local)
    return name, None


def build_layer_pair(layer_config, rank: int, world_size: int, reference_pgs, *, expert_module=None,
                     num_experts: int = NUM_EXPERTS, hidden: int = HIDDEN):
    """(one-process reference with every expert, this rank's expert-parallel layer) with the same
    weights: the reference's scaled up (a less uniform routing), the EP layer's copied from it."""
    torch.manual_seed(11)
    reference = build_layer(transformer_config(num_moe_experts=num_experts, hidden_size=hidden), layer_config,
                            expert_module=expert_module, pg_collection=reference_pgs)
    ep_layer = build_layer(transformer_config(num_moe_experts=num_experts, hidden_size=hidden,
                                              expert_model_parallel_size=world_size), layer_config,
                           expert_module=expert_module)
    num_local = num_experts // world_size
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(8.0)
        for name, param in ep_layer.named_parameters():
            ref_name, rows = _reference_name_and_slice(name, num_local, rank)
            param.copy_(ref_params[ref_name] if rows is None else ref_params[ref_name][rows])
    return reference, ep_layer


def global_batch(rank: int, world_size: int, *, tokens_per_rank: int, hidden: int):
    """(hidden states [N, 1, H], loss weights [N, 1, H], this rank's chunk) of a fixed global batch, float64."""
    gen = torch.Generator().manual_seed(5)
    hidden_all = torch.randn(world_size * tokens_per_rank, 1, hidden, generator=gen, dtype=torch.float64)
    weight_all = torch.randn(world_size * tokens_per_rank, 1, hidden, generator=gen, dtype=torch.float64)
    return hidden_all, weight_all, slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)


def gradient_diffs(ep_layer, ref_params: dict, num_local: int, rank: int, world_size: int) -> dict[str, float]:
    """Relative difference of every EP parameter gradient to the reference's, as megatron DDP would
    see it: replicated gradients averaged over the ranks, expert ones scaled by 1 / data-parallel size."""
    import torch.distributed as dist

    diffs = {}
    for name, param in ep_layer.named_parameters():
        ref_name, rows = _reference_name_and_slice(name, num_local, rank)
        ref_grad = ref_params[ref_name].grad
        ref_grad = ref_grad if rows is None else ref_grad[rows]
        grad = param.grad.clone()
        if getattr(param, "allreduce", True):
            dist.all_reduce(grad)
        diffs[f"grad:{name}"] = rel_diff(grad / world_size, ref_grad)
    return diffs


def _run_case(case: str, rank: int, world_size: int, reference_pgs) -> dict:
    import torch.distributed as dist
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import losses, stats

    ae = _ae_config(case)
    expert_module = SequentialMLP if case == "micro" else None
    reference, ep_layer = build_layer_pair(ae, rank, world_size, reference_pgs, expert_module=expert_module)
    num_local = NUM_EXPERTS // world_size
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        if ae.bias_update_rate > 0:
            bias = torch.linspace(-0.5, 0.5, NUM_EXPERTS, dtype=torch.float32)
            reference.router.selection_bias.copy_(bias)
            ep_layer.router.selection_bias.copy_(bias)
        for layer in (reference, ep_layer):  # statistics from an earlier step: not the identity
            layer.importance.logit_mean.fill_(0.3)
            layer.importance.logit_scale.fill_(0.7)
            if layer.router.controls_virtual:
                layer.router.virtual_bias.fill_(0.2)

    hidden_all, weight_all, chunk = global_batch(rank, world_size, tokens_per_rank=TOKENS_PER_RANK, hidden=HIDDEN)

    # Reference: one pass (global scope) or N micro-batches (micro scope).
    stats.reset()
    losses.reset_global_batch_state(reference)
    reference.train()
    x_ref = hidden_all.clone().requires_grad_(True)
    if case == "global":
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        out_ref, _ = reference(x_ref)
        ((out_ref * weight_all).sum() / len(hidden_all)).backward()
    else:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / world_size))
        outs = []
        for r in range(world_size):
            part = slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK)
            out_part, _ = reference(x_ref[part])
            ((out_part * weight_all[part]).sum() / TOKENS_PER_RANK / world_size).backward()
            outs.append(out_part)
        out_ref = torch.cat(outs)
    ref_stats = stats.collect()
    losses.update_selection_biases(reference, group=None)

    # Expert parallel: this rank's chunk, one pass.
    stats.reset()
    losses.reset_global_batch_state(ep_layer)
    ep_layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x_ep = hidden_all[chunk].clone().requires_grad_(True)
    out_ep, _ = ep_layer(x_ep)
    ((out_ep * weight_all[chunk]).sum() / TOKENS_PER_RANK).backward()
    ep_stats = stats.collect(group=dist.group.WORLD)
    losses.update_selection_biases(ep_layer)  # parallel_state's data-parallel group
    stats.reset()

    diffs = {"output": rel_diff(out_ep.detach(), out_ref.detach()[chunk]),
             "input_grad": rel_diff(x_ep.grad / world_size, x_ref.grad[chunk])}
    diffs.update(gradient_diffs(ep_layer, ref_params, num_local, rank, world_size))
    flags = {name: not getattr(param, "allreduce", True) for name, param in ep_layer.named_parameters()}
    for name in ("load_balance_loss", "budget_loss", "z_loss", "real_experts_per_token",
                 "virtual_experts_per_token", "importance_mean", "k_histogram", "dropped_slots"):
        diffs[f"stat:{name}"] = rel_diff(ep_stats[name][1], ref_stats[name][1])
    # Per-rank loads averaged over the ranks: 1/N of the one-pass reference's loads, and
    # equal to the micro-batch reference's mean over its N chunk-sized calls.
    scale = world_size if case == "global" else 1
    diffs["stat:tokens_per_expert"] = rel_diff(ep_stats["tokens_per_expert"][1] * scale,
                                               ref_stats["tokens_per_expert"][1])
    diffs["selection_bias"] = rel_diff(ep_layer.router.selection_bias, reference.router.selection_bias) \
        if ae.bias_update_rate > 0 else 0.0
    # The budget's integral controller moved (a non-zero offset) and moved the same way.
    assert float(reference.importance.logit_offset.abs()) > 0
    diffs["budget_offset"] = rel_diff(ep_layer.importance.logit_offset, reference.importance.logit_offset)
    if ae.virtual_target is not None:  # the virtual count is over every rank's tokens
        assert float(reference.router.virtual_bias) != 0.2
        diffs["virtual_bias"] = rel_diff(ep_layer.router.virtual_bias, reference.router.virtual_bias)
    if ae.importance_logit_std is not None:  # the logit statistics are over every rank's tokens
        assert float(reference.importance.logit_scale) != 1.0
        for name in ("logit_mean", "logit_scale"):
            diffs[name] = rel_diff(getattr(ep_layer.importance, name), getattr(reference.importance, name))
    print(f"rank {rank} EP={world_size} {case}: worst relative difference {max(diffs.values()):.1e}")
    return dict(diffs=diffs, expert_flags=flags, a2a_bytes=float(ep_stats["a2a_bytes"][1]),
                dropped=float(ref_stats["dropped_slots"][1]),
                grads_present=all(p.grad is not None for p in ep_layer.parameters() if p.requires_grad),
                num_params_with_grad=sum(p.grad is not None for p in ep_layer.parameters()))


def _world(rank, world_size):
    reference_pgs = _singleton_pg_collection(rank, world_size)
    return {case: _run_case(case, rank, world_size, reference_pgs) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def world(request):
    return request.param, run_distributed(_world, request.param, expert_parallel_size=request.param)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_equals_one_process(world, case):
    world_size, per_rank = world
    worst: dict[str, float] = {}
    for result in per_rank:
        for name, value in result[case]["diffs"].items():
            worst[name] = max(worst.get(name, 0.0), value)
    assert any(n.startswith("grad:importance.") for n in worst) and any(n.startswith("grad:router.") for n in worst)
    assert any(n.startswith("grad:experts.") for n in worst)
    failures = {n: v for n, v in worst.items() if not v <= 1e-9}
    assert not failures, f"EP={world_size} {case}: relative differences above 1e-9: {failures}"
    assert all(r[case]["grads_present"] for r in per_rank)


@pytest.mark.parametrize("case", CASES)
def test_expert_weights_are_in_the_expert_parallel_layout(world, case):
    _, per_rank = world
    flags = per_rank[0][case]["expert_flags"]
    assert {n for n, is_expert in flags.items() if is_expert} == {n for n in flags if n.startswith("experts.")}


def test_real_slots_travel_and_capacity_drops_are_counted(world):
    _, per_rank = world
    for result in per_rank:
        assert result["global"]["a2a_bytes"] > 0 and result["micro"]["a2a_bytes"] > 0
    assert per_rank[0]["micro"]["dropped"] > 0  # capacity_factor 1.0 drops some slots
