"""Least-loaded expert parallelism: the planner alone, then the rebalanced step against the plain one.

    OMP_NUM_THREADS=1 python -m pytest tests/test_rebalance.py -q

Planner (no processes): counts conserved, the home keeps its slots up to the cap, chunks
respect the minimum, the balanced case and zero slots plan nothing, the config's checks.
Distributed (gloo, 2 and 4 ranks; one spawn per world runs every case): on skewed routings
(everything on one expert, everything on one rank's experts, Zipf popularity, empty ranks)
- dispatcher + GroupedExperts (with biases): outputs and the gradients of hidden states,
  gates and every expert weight of the rebalanced step equal the plain step's;
- the AnyExperts layer at EP = world and at EP = 2 x DP = 2 (4 ranks): outputs, input and
  every parameter gradient (expert ones reduced over the expert-data-parallel group, the
  others over the data-parallel group, as megatron DDP does), and the statistics it logs;
- a short Adam training run of the layer with rebalancing equals one without, step for step.
float64; tolerance 1e-6 relative (observed differences are float64 rounding, ~1e-15).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anyexperts.moe.rebalance import RebalanceConfig, plan_rebalance
from tests.distributed import run_distributed

HIDDEN, FFN, SLOTS, TOKENS = 8, 4, 3, 24
NUM_EXPERTS = 8
TOLERANCE = 1e-6
ROUTINGS = ("one_expert", "one_rank", "zipf", "empty_ranks", "balanced")


# ----------------------------------------------------------------------------------- planner
def _zipf_counts(num_ranks: int, num_experts: int, slots_per_rank: int, s: float, seed: int = 0) -> torch.Tensor:
    """Zipf popularity with the most popular experts on rank 0 (the worst layout)."""
    gen = torch.Generator().manual_seed(seed)
    popularity_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return torch.stack([torch.multinomial(popularity_E, slots_per_rank, replacement=True, generator=gen)
                        .bincount(minlength=num_experts) for _ in range(num_ranks)])


def _check_plan_invariants(counts_RE: torch.Tensor, plan, config: RebalanceConfig) -> None:
    flows_SDE = plan.flows_SDE
    num_ranks, num_experts = counts_RE.shape
    local = num_experts // num_ranks
    assert torch.equal(flows_SDE.sum(1), counts_RE)  # every source's slots go somewhere, once
    assert torch.equal(flows_SDE.sum((0, 2)), plan.load_after_R)
    computed_DE = flows_SDE.sum(0)
    cap = -(-int(config.cap_factor * counts_RE.sum()) // num_ranks)
    for expert in range(num_experts):
        home = expert // local
        for helper in range(num_ranks):
            moved = int(computed_DE[helper, expert])
            if helper != home and moved:
                last_piece = moved == int(computed_DE[:, expert].sum()) - int(computed_DE[home, expert])
                assert moved >= config.min_chunk or last_piece, (expert, helper, moved)
    assert int(plan.load_after_R.max()) <= max(cap, int(plan.load_before_R.max()))


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("zipf_s", [1.0, 1.5])
def test_zipf_plans_conserve_slots_and_reach_the_target(num_ranks, zipf_s):
    config = RebalanceConfig(enable=True, cap_factor=1.0, min_chunk=16)
    counts_RE = _zipf_counts(num_ranks, 4 * num_ranks, 4096, zipf_s)
    plan = plan_rebalance(counts_RE, config)
    assert plan.active and plan.imbalance_before > config.threshold
    _check_plan_invariants(counts_RE, plan, config)
    assert plan.imbalance_after <= 1.1, plan.imbalance_after
    assert plan.num_moved_slots > 0 and plan.num_weight_copies > 0


def test_everything_on_one_expert_spreads_to_every_rank():
    counts_RE = torch.zeros(4, 8, dtype=torch.int64)
    counts_RE[:, 5] = 30  # expert 5 lives on rank 2
    plan = plan_rebalance(counts_RE, RebalanceConfig(enable=True))
    assert plan.imbalance_before == 4.0 and plan.imbalance_after == 1.0
    assert plan.load_after_R.tolist() == [30, 30, 30, 30]
    # Each rank computes its own slots of expert 5: nothing but the weights moves.
    assert plan.num_moved_slots == 90 and torch.equal(plan.flows_SDE[:, :, 5], torch.diag(torch.full((4,), 30)))
    assert plan.lent(2) == [(5, 0), (5, 1), (5, 3)] and plan.borrowed(0) == [5] and plan.borrowed(2) == []


def test_home_keeps_slots_up_to_the_cap_and_cold_experts_do_not_move():
    counts_RE = torch.tensor([[50, 10, 5, 5], [50, 10, 5, 5]])  # rank 0 owns experts 0, 1
    plan = plan_rebalance(counts_RE, RebalanceConfig(enable=True))
    computed_DE = plan.flows_SDE.sum(0)
    assert computed_DE[:, 1].tolist() == [20, 0] and computed_DE[:, 2:].tolist() == [[0, 0], [10, 10]]
    assert computed_DE[:, 0].tolist() == [50, 50] and plan.load_after_R.tolist() == [70, 70]


def test_min_chunk_keeps_small_chunks_at_home():
    counts_RE = torch.tensor([[40, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert plan_rebalance(counts_RE, RebalanceConfig(enable=True, min_chunk=10)).load_after_R.tolist() == [10] * 4
    # Every helper's room (10) is below the minimum chunk and not the whole rest (30): nothing moves.
    assert not plan_rebalance(counts_RE, RebalanceConfig(enable=True, min_chunk=15)).active
    plan = plan_rebalance(counts_RE, RebalanceConfig(enable=True, min_chunk=15, cap_factor=2.0))
    assert plan.load_after_R.tolist() == [20, 20, 0, 0]


@pytest.mark.parametrize("counts", [[[4, 4, 4, 4], [4, 4, 4, 4]], [[0, 0, 0, 0], [0, 0, 0, 0]],
                                    [[6, 5, 4, 4], [5, 5, 4, 4]]], ids=["balanced", "empty", "under_threshold"])
def test_nothing_is_planned_below_the_threshold(counts):
    plan = plan_rebalance(torch.tensor(counts), RebalanceConfig(enable=True))
    assert not plan.active and plan.imbalance_after == plan.imbalance_before <= 1.3
    assert plan.borrowed(0) == [] and plan.lent(1) == [] and plan.num_moved_slots == 0


@pytest.mark.parametrize("field, value, message", [("threshold", 0.9, "must be >= 1"),
                                                   ("cap_factor", 0.0, "must be > 0"),
                                                   ("min_chunk", 0, "must be an integer >= 1")])
def test_config_fields_are_checked_by_name(field, value, message):
    from anyexperts.config import TrainConfig, validate

    with pytest.raises(ValueError, match=rf"moe\.rebalance\.{field}={value} {message}"):
        RebalanceConfig(**{field: value}).validate(prefix="moe.rebalance.")
    cfg = TrainConfig()
    cfg.moe.kind = "anyexperts"
    setattr(cfg.moe.rebalance, field, value)
    with pytest.raises(ValueError, match=rf"moe\.rebalance\.{field}="):
        validate(cfg, world_size=1)


def test_rebalancing_needs_the_anyexperts_layer():
    from anyexperts.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.moe.kind = "topk"
    cfg.moe.rebalance.enable = True
    with pytest.raises(ValueError, match=r"moe\.rebalance\.enable=True needs the AnyExperts layer"):
        validate(cfg, world_size=1)


def test_rebalancing_needs_an_expert_module_that_borrows_weights():
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts import AnyExpertsConfig
    from anyexperts.moe.specs import get_anyexperts_moe_spec
    from tests.test_anyexperts_layer import no_process_groups, transformer_config

    spec = get_anyexperts_moe_spec(AnyExpertsConfig(), expert_module=SequentialMLP,
                                   rebalance=RebalanceConfig(enable=True))
    with pytest.raises(ValueError, match=r"moe\.rebalance\.enable=True needs an expert module .*SequentialMLP"):
        build_module(spec, config=transformer_config(), layer_number=1, pg_collection=no_process_groups())
    spec = get_anyexperts_moe_spec(AnyExpertsConfig(), rebalance=RebalanceConfig(enable=True, cap_factor=-1.0))
    with pytest.raises(ValueError, match=r"moe\.rebalance\.cap_factor=-1\.0 must be > 0"):
        build_module(spec, config=transformer_config(), layer_number=1, pg_collection=no_process_groups())


# ----------------------------------------------------------------------------------- rank code
def skewed_routing(case: str, rank: int, world_size: int, *, num_tokens: int = TOKENS, dtype=torch.float64):
    """(hidden_TH, expert_TK, gate_TK) of one rank; distinct experts per token, -1 = no slot."""
    gen = torch.Generator().manual_seed(100 * rank + ROUTINGS.index(case))
    local = NUM_EXPERTS // world_size
    if case == "empty_ranks" and rank == 1:
        num_tokens = 0
    hidden_TH = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=dtype)
    gate_TK = torch.rand(num_tokens, SLOTS, generator=gen, dtype=dtype)
    expert_TK = torch.full((num_tokens, SLOTS), -1, dtype=torch.int64)
    if case == "one_expert":
        expert_TK[:, 0] = 3
    elif case == "one_rank":  # rank 0's experts only
        for k in range(min(SLOTS, local)):
            expert_TK[:, k] = k
        expert_TK[torch.rand(num_tokens, SLOTS, generator=gen) < 0.2] = -1
    elif case in ("zipf", "balanced"):
        s = 1.5 if case == "zipf" else 0.0
        popularity_E = 1.0 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** s
        for t in range(num_tokens):
            expert_TK[t] = torch.multinomial(popularity_E, SLOTS, replacement=False, generator=gen)
    elif case == "empty_ranks":  # rank 1 has no tokens, the last rank sends nothing
        if rank != world_size - 1:
            expert_TK[:, 0] = NUM_EXPERTS - 1
            expert_TK[::2, 1] = NUM_EXPERTS - 2 if local > 1 else 0
    return hidden_TH, expert_TK, gate_TK


def _dispatch_step(dispatcher, experts, hidden_TH, expert_TK, gate_TK, grad_TH):
    tokens_NH, counts, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
    plan = dispatcher.last_plan
    if plan is not None and plan.active:
        out_NH, _ = experts.forward_with_borrowed(tokens_NH, counts, probs_N,
                                                  dispatcher.borrow_weights(experts.expert_weights()))
    else:
        out_NH, _ = experts(tokens_NH, counts, probs_N)
    y_TH = dispatcher.combine(out_NH)
    grads = torch.autograd.grad(y_TH, (hidden_TH, gate_TK, *experts.expert_weights()), grad_TH)
    return y_TH.detach(), grads, plan


def _dispatcher_cases(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.dispatcher import VariableSlotAllToAll
    from anyexperts.moe.experts import GroupedExperts

    ep_group = parallel_state.get_expert_model_parallel_group()
    local = NUM_EXPERTS // world_size
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=NUM_EXPERTS,
                               ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=True, use_cpu_initialization=True,
                               params_dtype=torch.float64, expert_model_parallel_size=world_size)
    torch.manual_seed(rank)
    experts = GroupedExperts(local, config, expert_path="loop")
    with torch.no_grad():
        for w in experts.expert_weights():
            w.normal_()
    rebalance = {"zipf": RebalanceConfig(enable=True, cap_factor=1.05, min_chunk=3)}
    results = {}
    for case in ROUTINGS:
        hidden_TH, expert_TK, gate_TK = skewed_routing(case, rank, world_size)
        hidden_TH.requires_grad_(True)
        gate_TK.requires_grad_(True)
        grad_TH = torch.randn(hidden_TH.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        plain = VariableSlotAllToAll(num_experts=NUM_EXPERTS, ep_group=ep_group)
        balanced = VariableSlotAllToAll(num_experts=NUM_EXPERTS, ep_group=ep_group,
                                        rebalance=rebalance.get(case, RebalanceConfig(enable=True)))
        y_ref, grads_ref, _ = _dispatch_step(plain, experts, hidden_TH, expert_TK, gate_TK, grad_TH)
        y, grads, plan = _dispatch_step(balanced, experts, hidden_TH, expert_TK, gate_TK, grad_TH)
        names = ("output", "grad_hidden", "grad_gate") + tuple(f"grad_{n}" for n in ("fc1_weight", "fc2_weight",
                                                                                    "fc1_bias", "fc2_bias"))
        diffs = {name: _rel_diff(a, b) for name, a, b in zip(names, (y, *grads), (y_ref, *grads_ref))}
        results[case] = dict(diffs=diffs, active=plan.active, before=plan.imbalance_before,
                             after=plan.imbalance_after, borrowed=list(balanced.borrowed_experts),
                             weight_bytes=balanced.last_weight_bytes_sent,
                             row_sums=float(y_ref.abs().sum()))
    return results


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0 if a.shape == b.shape else float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _layer_pair(world_size: int, ep_size: int, rebalance: RebalanceConfig, skew_X: torch.Tensor,
                capacity_factor=None):
    """(plain layer, rebalanced layer) with the same weights, the router's selection skewed by skew_X."""
    from anyexperts import AnyExpertsConfig
    from tests.test_anyexperts_layer import build_layer, transformer_config

    ae = AnyExpertsConfig(k_min=1, k_max=3, k_rounding="straight_through", num_virtual_experts=1, rho_max=0.34,
                          virtual_kind="copy", alpha=0.2, learn_alpha=True, load_balance_coeff=0.1,
                          budget_coeff=0.5, budget_target=2.0, z_loss_coeff=0.01, bias_update_rate=1e-9,
                          capacity_factor=capacity_factor)
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts.moe.specs import get_anyexperts_moe_spec

    config = transformer_config(num_moe_experts=NUM_EXPERTS, hidden_size=HIDDEN, expert_model_parallel_size=ep_size,
                                add_bias_linear=True)
    layers = []
    for rebal in (None, rebalance):
        torch.manual_seed(3)
        layer = build_module(get_anyexperts_moe_spec(ae, rebalance=rebal), config=config, layer_number=1)
        with torch.no_grad():
            layer.router.selection_bias.copy_(skew_X)
            for name, p in layer.named_parameters():
                if name.startswith("experts."):
                    p.normal_(generator=torch.Generator().manual_seed(7))
        layers.append(layer)
    with torch.no_grad():
        for a, b in zip(layers[0].parameters(), layers[1].parameters()):
            b.copy_(a)
    return layers


def _reduce_like_ddp(layer):
    """Gradients as megatron DDP leaves them: expert ones averaged over the expert-data-parallel
    group, the others over the data-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    grads = {}
    for name, param in layer.named_parameters():
        # A rank without tokens leaves some gradients unset; DDP reduces zeros for them.
        grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        if getattr(param, "allreduce", True):
            group = parallel_state.get_data_parallel_group()
        else:
            group = parallel_state.get_expert_data_parallel_group()
        dist.all_reduce(grad, group=group)
        grads[name] = grad / dist.get_world_size(group)
    return grads


def _skews(world_size: int, ep_size: int) -> dict:
    local = NUM_EXPERTS // ep_size
    one_rank_X = torch.zeros(NUM_EXPERTS)
    one_rank_X[:local] = 30.0
    one_expert_X = torch.zeros(NUM_EXPERTS)
    one_expert_X[NUM_EXPERTS - 1] = 30.0
    zipf_X = 6.0 * torch.log(1.0 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float32))[torch.randperm(
        NUM_EXPERTS, generator=torch.Generator().manual_seed(1))]
    return {"one_rank": one_rank_X, "one_expert": one_expert_X, "zipf": zipf_X}


def _layer_cases(rank: int, world_size: int, ep_size: int) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import stats

    results = {}
    for case, skew_X in _skews(world_size, ep_size).items():
        # Capacity (decided per rank before the plan) composes with it: the same slots are dropped.
        # Threshold 1: small batches are only mildly skewed at EP = 2 with an empty rank.
        plain, balanced = _layer_pair(world_size, ep_size, RebalanceConfig(enable=True, threshold=1.0), skew_X,
                                      capacity_factor=2.0 if case == "zipf" else None)
        gen = torch.Generator().manual_seed(50 + rank)
        tokens = 0 if (case == "one_expert" and rank == 1) else 16  # an empty rank
        x = torch.randn(tokens, 1, HIDDEN, generator=gen, dtype=torch.float64)
        weight = torch.randn(tokens, 1, HIDDEN, generator=gen, dtype=torch.float64)
        outs, grads, logged = [], [], []
        for layer in (plain, balanced):
            stats.reset()
            layer.train()
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
            x_in = x.clone().requires_grad_(True)
            out, _ = layer(x_in)
            (out * weight).sum().backward()
            outs.append(out.detach())
            grads.append(dict(input=x_in.grad, **_reduce_like_ddp(layer)))
            logged.append(stats.collect())
            stats.reset()
        diffs = {"output": _rel_diff(outs[1], outs[0])}
        diffs.update({f"grad:{n}": _rel_diff(grads[1][n], grads[0][n]) for n in grads[0]})
        for name in ("load_balance_loss", "budget_loss", "z_loss", "tokens_per_expert", "dropped_slots"):
            if tokens > 0:  # a rank without tokens records nothing
                diffs[f"stat:{name}"] = _rel_diff(logged[1][name][1], logged[0][name][1])
        results[case] = dict(diffs=diffs, stats={n: float(logged[1][n][1]) for n in (
            "rank_load_imbalance_before", "rank_load_imbalance_after", "rebalance_active", "rebalanced_slots",
            "rebalance_weight_bytes") if tokens > 0},
            plain_has_no_rebalance_stats="rank_load_imbalance_before" not in logged[0],
            dropped=float(logged[0]["dropped_slots"][1]) if tokens > 0 else 0.0)
    return results


def _training_run(rank: int, world_size: int, ep_size: int, steps: int = 4) -> dict:
    """Adam steps of the layer on skewed routing, plain and rebalanced: losses per step."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import stats

    runs = []
    for layer in _layer_pair(world_size, ep_size, RebalanceConfig(enable=True, min_chunk=2),
                             _skews(world_size, ep_size)["zipf"]):
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
        layer.train()
        losses, active = [], []
        for step in range(steps):
            gen = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(16, 1, HIDDEN, generator=gen, dtype=torch.float64)
            target = torch.randn(16, 1, HIDDEN, generator=gen, dtype=torch.float64)
            optimizer.zero_grad()
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
            out, _ = layer(x)
            loss = ((out - target) ** 2).mean()
            loss.backward()
            params = dict(layer.named_parameters())
            for name, grad in _reduce_like_ddp(layer).items():
                params[name].grad = grad
            optimizer.step()
            losses.append(float(loss))
            plan = layer.token_dispatcher.last_plan
            active.append(plan is not None and plan.active)
        stats.reset()
        runs.append(dict(losses=losses, active=active,
                         params={n: p.detach().clone() for n, p in layer.named_parameters()}))
    plain, balanced = runs
    return dict(plain=plain["losses"], balanced=balanced["losses"], active=balanced["active"],
                param_diff=max(_rel_diff(balanced["params"][n], plain["params"][n]) for n in plain["params"]))


def _world(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    ep_size = parallel_state.get_expert_model_parallel_world_size()
    results = {"layer": _layer_cases(rank, world_size, ep_size), "training": _training_run(rank, world_size, ep_size)}
    if ep_size == world_size:
        results["dispatcher"] = _dispatcher_cases(rank, world_size)
    return results


@pytest.fixture(scope="module", params=[(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2xdp2"])
def world(request):
    world_size, ep_size = request.param
    return request.param, run_distributed(_world, world_size, expert_parallel_size=ep_size)


def _worst(per_rank: list, section: str, case: str) -> dict:
    worst: dict = {}
    for result in per_rank:
        for name, value in result[section][case]["diffs"].items():
            worst[name] = max(worst.get(name, 0.0), value)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("case", ROUTINGS)
def test_rebalanced_dispatch_equals_plain(world, case):
    (world_size, ep_size), per_rank = world
    if ep_size != world_size:
        pytest.skip("the dispatcher cases run at EP = world")
    worst = _worst(per_rank, "dispatcher", case)
    assert len(worst) == 7 and all(v <= TOLERANCE for v in worst.values()), worst
    assert per_rank[0]["dispatcher"][case]["row_sums"] > 0
    first = per_rank[0]["dispatcher"][case]
    assert first["active"] == (case != "balanced"), first
    if case != "balanced":
        assert first["after"] < first["before"] and any(r["dispatcher"][case]["borrowed"] for r in per_rank)
        assert sum(r["dispatcher"][case]["weight_bytes"] for r in per_rank) > 0
    if case in ("one_expert", "empty_ranks"):
        assert first["after"] <= 1.1, first


@pytest.mark.slow
@pytest.mark.parametrize("case", ("one_rank", "one_expert", "zipf"))
def test_rebalanced_layer_equals_plain_after_ddp(world, case):
    (world_size, ep_size), per_rank = world
    worst = _worst(per_rank, "layer", case)
    assert any(n.startswith("grad:experts.") for n in worst) and any(n.startswith("grad:router.") for n in worst)
    failures = {n: v for n, v in worst.items() if not v <= TOLERANCE}
    assert not failures, f"world {world_size} EP={ep_size} {case}: {failures}"
    logged = [r["layer"][case]["stats"] for r in per_rank if r["layer"][case]["stats"]]
    assert all(r["layer"][case]["plain_has_no_rebalance_stats"] for r in per_rank)
    assert logged and all(s["rebalance_active"] == 1.0 for s in logged), logged
    assert all(s["rank_load_imbalance_after"] < s["rank_load_imbalance_before"] for s in logged), logged
    assert logged[0]["rebalanced_slots"] > 0
    if len(logged) == len(per_rank):  # a rank without tokens records nothing, also what it lent
        assert sum(s["rebalance_weight_bytes"] for s in logged) > 0


@pytest.mark.slow
def test_training_with_rebalancing_equals_plain_step_for_step(world):
    _, per_rank = world
    for result in per_rank:
        run = result["training"]
        assert any(run["active"]), run
        for plain, balanced in zip(run["plain"], run["balanced"]):
            assert abs(balanced - plain) <= TOLERANCE * abs(plain), run
        assert run["param_diff"] <= TOLERANCE, run
        assert run["plain"][0] != run["plain"][-1]  # the run trained


# ------------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """Two 2-process EP=2 training runs through the entry point, without and with rebalancing
    (threshold 1: every step with any imbalance plans)."""
    import sys

    from tests.test_train_e2e import ANYEXPERTS, COMMON, _run

    root = tmp_path_factory.mktemp("rebalance_runs")
    dirs = {}
    for name, extra in (("plain", []), ("rebalanced", ["moe.rebalance.enable=true", "moe.rebalance.threshold=1.0"])):
        dirs[name] = root / name
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "launcher.train", *COMMON, *ANYEXPERTS, *extra, "trainer.max_steps=5",
              "trainer.routing_trace_interval=0", f"experiment.run_dir={dirs[name]}"])
    return dirs


@pytest.mark.slow
def test_training_run_with_rebalancing_equals_plain_and_logs_the_plan(trainer_runs):
    import json

    records = {name: [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
               for name, path in trainer_runs.items()}
    assert len(records["plain"]) == len(records["rebalanced"]) == 5
    for step, (plain, balanced) in enumerate(zip(records["plain"], records["rebalanced"]), start=1):
        # float32: the rebalanced step sums the same terms in another order.
        assert abs(plain["loss"] - balanced["loss"]) <= 1e-5, f"step {step}: {plain['loss']} vs {balanced['loss']}"
    last = records["rebalanced"][-1]
    for layer in (1, 2):
        for name in ("rank_load_imbalance_before", "rank_load_imbalance_after", "rebalanced_slots",
                     "rebalance_weight_bytes", "rebalance_active"):
            assert f"moe/{name}/layer{layer}" in last, name
        assert "moe/rank_load_imbalance_before/layer1" not in records["plain"][-1]
    active = [r[f"moe/rebalance_active/layer{layer}"] for r in records["rebalanced"] for layer in (1, 2)]
    assert max(active) > 0, active
    for r in records["rebalanced"]:
        for layer in (1, 2):
            assert r[f"moe/rank_load_imbalance_after/layer{layer}"] <= r[f"moe/rank_load_imbalance_before/layer{layer}"]
