"""Expert parallelism for the rival routers: top-p and ReMoE in the AnyExperts layer at EP = 2
equal one process.

    OMP_NUM_THREADS=1 python -m pytest tests/test_rivals_distributed.py -q

The harness of tests/test_anyexperts_distributed.py, micro-batch case: each rank builds a
one-process reference (all experts, singleton groups) and the expert-parallel layer (its
slice of the experts), and gets its chunk of the global batch. The rivals' regularisers
(top-p's entropy, ReMoE's load-weighted L1) and the load-balance loss are means over a
rank's own tokens, so one EP step must equal the reference run over the chunks as
micro-batches with gradient accumulation (main loss / N, aux loss scale 1 / N). Compared:
outputs, input gradient, every parameter gradient (non-expert ones averaged over the ranks,
expert ones scaled by 1 / data-parallel size, as megatron DDP does), the logged statistics,
and the budget controller after the update (p or lambda: the EP ranks all-reduce their counts,
the reference sums its micro-batches'). float64; tolerance 1e-9 relative to each tensor's scale.
Top-p runs the project's GroupedExperts, ReMoE megatron's SequentialMLP.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_anyexperts_distributed import _singleton_pg_collection, build_layer_pair, global_batch, gradient_diffs
from tests.test_anyexperts_layer import rel_diff

pytestmark = pytest.mark.slow

TOKENS_PER_RANK, HIDDEN, NUM_EXPERTS, WORLD_SIZE = 12, 16, 8, 2
CASES = ("topp", "remoe")
STATS = {"topp": ("entropy_loss", "top_p", "load_balance_loss"), "remoe": ("l1_loss", "l1_coeff")}


def _routing_config(case: str):
    from anyexperts.moe.config import ReMoEConfig, TopPConfig

    if case == "topp":
        return TopPConfig(top_p=0.5, max_experts=6, entropy_coeff=0.1, target_real_experts=2.0, p_update_rate=0.05,
                          load_balance_coeff=0.1)
    return ReMoEConfig(l1_coeff=0.1, l1_balance=True, target_real_experts=2.0, capacity_factor=1.5)


def _run_case(case: str, rank: int, world_size: int, reference_pgs) -> dict:
    import torch.distributed as dist
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import losses, stats

    routing_config = _routing_config(case)
    expert_module = SequentialMLP if case == "remoe" else None
    reference, ep_layer = build_layer_pair(routing_config, rank, world_size, reference_pgs, expert_module=expert_module,
                                           num_experts=NUM_EXPERTS, hidden=HIDDEN)
    num_local = NUM_EXPERTS // world_size
    ref_params = dict(reference.named_parameters())
    hidden_all, weight_all, chunk = global_batch(rank, world_size, tokens_per_rank=TOKENS_PER_RANK, hidden=HIDDEN)

    stats.reset()
    reference.train()
    x_ref = hidden_all.clone().requires_grad_(True)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / world_size))
    outs = []
    for r in range(world_size):
        part = slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK)
        out_part, _ = reference(x_ref[part])
        ((out_part * weight_all[part]).sum() / TOKENS_PER_RANK / world_size).backward()
        outs.append(out_part)
    out_ref = torch.cat(outs)
    ref_stats = stats.collect()
    value_before = float(reference.router.controller.value)
    losses.update_selection_biases(reference, group=None)

    stats.reset()
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
    for name in ("real_experts_per_token", "k_histogram", "dropped_slots", *STATS[case]):
        diffs[f"stat:{name}"] = rel_diff(ep_stats[name][1], ref_stats[name][1])
    diffs["controller"] = rel_diff(ep_layer.router.controller.value, reference.router.controller.value)
    print(f"rank {rank} EP={world_size} {case}: worst relative difference {max(diffs.values()):.1e}")
    return dict(diffs=diffs, param_names=[n for n, _ in ep_layer.named_parameters()],
                controller_moved=float(reference.router.controller.value) != value_before,
                real_experts_per_token=float(ref_stats["real_experts_per_token"][1]),
                dropped=float(ref_stats["dropped_slots"][1]), a2a_bytes=float(ep_stats["a2a_bytes"][1]))


def _world(rank, world_size):
    reference_pgs = _singleton_pg_collection(rank, world_size)
    return {case: _run_case(case, rank, world_size, reference_pgs) for case in CASES}


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_world, WORLD_SIZE, expert_parallel_size=WORLD_SIZE)


@pytest.mark.parametrize("case", CASES)
def test_rival_router_at_ep2_equals_one_process(per_rank, case):
    worst: dict[str, float] = {}
    for result in per_rank:
        for name, value in result[case]["diffs"].items():
            worst[name] = max(worst.get(name, 0.0), value)
    assert any(n.startswith("grad:router.") for n in worst) and any(n.startswith("grad:experts.") for n in worst)
    failures = {n: v for n, v in worst.items() if not v <= 1e-9}
    assert not failures, f"EP={WORLD_SIZE} {case}: relative differences above 1e-9: {failures}"


@pytest.mark.parametrize("case", CASES)
def test_rival_cases_exercise_routing_controller_and_dispatch(per_rank, case):
    result = per_rank[0][case]
    assert not any(n.startswith("importance.") for n in result["param_names"])
    assert result["controller_moved"]
    assert result["real_experts_per_token"] != 2.0  # the controller had something to correct
    assert all(r[case]["a2a_bytes"] > 0 for r in per_rank)
    if case == "remoe":
        assert result["dropped"] > 0  # capacity_factor 1.5 drops some slots, ranked by total gate
