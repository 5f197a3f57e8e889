"""Unit and property tests of the AnyExperts routing steps, in one process (no spawn).

    OMP_NUM_THREADS=1 python -m pytest tests/test_anyexperts_router.py -q

Covers importance -> K (round and position dither), the real/virtual selection with its
cap (against a per-token reference loop), gates, capacity with importance-aware dropping,
the aux losses (against megatron's own loss functions where they coincide), bias
balancing, the stats sink, and AnyExpertsConfig's ValueErrors. The dither's layout test
builds one AnyExperts layer in this process (CPU patches, no process groups).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anyexperts.moe.capacity import apply_capacity, expert_capacity
from anyexperts.moe.config import AnyExpertsConfig
from anyexperts.moe.importance import ImportancePredictor
from anyexperts.moe.losses import (AuxLossTerms, load_balance_loss,
                                   reset_global_batch_state, z_loss)
from anyexperts.moe.router import (compute_gates, count_per_expert, dithered_num_slots, max_virtual_table,
                                   num_slots_from_importance, select_slots, sequence_positions)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routing_cases(draw):
    """A valid AnyExpertsConfig's routing knobs plus random logits and importance."""
    num_experts = draw(st.integers(1, 8))
    num_virtual = draw(st.integers(0, 3))
    rho_max = 0.0 if num_virtual == 0 else draw(st.sampled_from([0.0, 0.1, 0.25, 0.34, 0.5, 0.75, 0.99]))
    k_min = draw(st.integers(1, 4))
    k_max = draw(st.integers(k_min, 7))
    cfg = AnyExpertsConfig(k_min=k_min, k_max=k_max, num_virtual_experts=num_virtual, rho_max=rho_max)
    try:
        cfg.validate(num_experts=num_experts)
    except ValueError:
        assume(False)
    num_tokens = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts + num_virtual, generator=gen, dtype=torch.float64) * 3
    importance = torch.rand(num_tokens, generator=gen, dtype=torch.float64)
    # Hit the ends exactly as well.
    importance[0] = draw(st.sampled_from([0.0, 1.0, 0.5, float(importance[0])]))
    gate_norm = draw(st.sampled_from(["all", "real"]))
    return cfg, num_experts, logits, importance, gate_norm


def route(cfg, num_experts, logits, importance):
    num_slots = num_slots_from_importance(importance, k_min=cfg.k_min, k_max=cfg.k_max)
    max_virtual = max_virtual_table(rho_max=cfg.rho_max, k_max=cfg.k_max)[num_slots]
    entries = select_slots(logits, num_slots, max_virtual, num_experts=num_experts, k_max=cfg.k_max)
    return num_slots, max_virtual, entries


def reference_selection(scores, num_slots: int, max_virtual: int, num_experts: int) -> list[int]:
    """Greedy per-token loop: walk entries best first, skip virtual ones past the cap."""
    chosen, num_virtual = [], 0
    for entry in torch.argsort(scores, descending=True, stable=True).tolist():
        if len(chosen) == num_slots:
            break
        if entry >= num_experts:
            if num_virtual == max_virtual:
                continue
            num_virtual += 1
        chosen.append(entry)
    return chosen


@SETTINGS
@given(routing_cases())
def test_selection_invariants_and_reference(case):
    cfg, num_experts, logits, importance, _ = case
    num_slots, max_virtual, entries = route(cfg, num_experts, logits, importance)
    assert entries.shape == (logits.shape[0], cfg.k_max)
    assert ((num_slots >= cfg.k_min) & (num_slots <= cfg.k_max)).all()
    assert (num_slots[importance == 0] == cfg.k_min).all() and (num_slots[importance == 1] == cfg.k_max).all()
    used = entries >= 0
    assert torch.equal(used.sum(-1), num_slots)
    # Used slots come first, in rank order.
    assert torch.equal(used, torch.arange(cfg.k_max).expand_as(used) < num_slots.unsqueeze(-1))
    virtual = entries >= num_experts
    for t in range(logits.shape[0]):
        k = int(num_slots[t])
        assert int(virtual[t].sum()) <= math.floor(cfg.rho_max * k)
        assert len(set(entries[t, :k].tolist())) == k, "an entry selected twice"
        assert entries[t, :k].tolist() == reference_selection(logits[t], k, int(max_virtual[t]), num_experts)


@SETTINGS
@given(routing_cases())
def test_gates_normalised_over_the_chosen_set(case):
    cfg, num_experts, logits, importance, gate_norm = case
    _, _, entries = route(cfg, num_experts, logits, importance)
    logits = logits.clone().requires_grad_(True)
    gates = compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm)
    used, real = entries >= 0, (entries >= 0) & (entries < num_experts)
    assert (gates >= 0).all() and (gates[~used] == 0).all()
    norm_set = real if gate_norm == "real" else used
    torch.testing.assert_close(gates.masked_fill(~norm_set, 0).sum(-1), torch.ones(len(gates), dtype=gates.dtype))
    # Ratios of gates are ratios of the softmax probabilities.
    probs = torch.softmax(logits.detach(), dim=-1)
    p_sel = probs.gather(1, entries.clamp(min=0)).masked_fill(~used, 0)
    norm = p_sel.masked_fill(~norm_set, 0).sum(-1, keepdim=True)
    # With gate_norm="real" a virtual gate is its share of the real entries and itself.
    expected = torch.where(used & ~norm_set, p_sel / (norm + p_sel), p_sel / norm)
    torch.testing.assert_close(gates.detach(), expected)
    assert torch.all(gates[used & ~norm_set] < 1)
    gates.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_zero_importance_gets_k_min_and_one_gets_k_max():
    importance = torch.tensor([0.0, 1.0, 0.49, 0.51, 0.25])
    assert num_slots_from_importance(importance, k_min=2, k_max=6).tolist() == [2, 6, 4, 4, 3]
    assert num_slots_from_importance(importance, k_min=3, k_max=3).tolist() == [3] * 5


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 4), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 1.0, 0.5, 1.0 - 1e-12]))
def test_dithered_slots_stay_in_bounds_and_hit_the_ends(k_min, extra, seq_len, batch, seed, end_value):
    k_max = k_min + extra
    positions = sequence_positions((seq_len, batch, 8))
    importance = torch.rand(len(positions), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    importance[::3] = end_value
    importance[1::5] = 0.0
    importance[2::7] = 1.0
    num_slots = dithered_num_slots(importance, positions, k_min=k_min, k_max=k_max)
    assert num_slots.dtype == torch.int64
    assert ((num_slots >= k_min) & (num_slots <= k_max)).all()
    assert (num_slots[importance == 0] == k_min).all() and (num_slots[importance == 1] == k_max).all()
    # Far positions (s * step large) and w just below 1 still stay in bounds.
    far = dithered_num_slots(importance, positions + 10**7, k_min=k_min, k_max=k_max)
    assert ((far >= k_min) & (far <= k_max)).all() and (far[importance == 1] == k_max).all()


@pytest.mark.parametrize("k_min, k_max", [(1, 3), (2, 6)])
@pytest.mark.parametrize("w", [0.05, 0.25, 0.4, 0.5, 0.62, 0.9])
def test_dithered_mean_slots_track_importance_over_a_sequence(k_min, k_max, w):
    positions = sequence_positions((128, 3, 8))  # 3 sequences of 128 positions
    importance = torch.full((len(positions),), w, dtype=torch.float64)
    num_slots = dithered_num_slots(importance, positions, k_min=k_min, k_max=k_max)
    assert abs(float(num_slots.double().mean()) - (k_min + w * (k_max - k_min))) <= 1 / 64


def test_nearest_rounding_misses_the_mean_that_dither_meets():
    # The Shakespeare case: K in [1, 3], w concentrated at 0.4 -> target 1.8 slots per token.
    importance = torch.full((128,), 0.4, dtype=torch.float64)
    nearest = num_slots_from_importance(importance, k_min=1, k_max=3)
    dithered = dithered_num_slots(importance, sequence_positions((128, 1, 8)), k_min=1, k_max=3)
    assert float(nearest.double().mean()) == 2.0  # round(0.8) for every token
    assert abs(float(dithered.double().mean()) - 1.8) <= 1 / 64
    assert set(dithered.tolist()) == {1, 2}


def test_dithered_layer_routes_the_same_whole_or_split_by_batch():
    from anyexperts.moe.trace import routing_trace
    from tests.test_anyexperts_layer import build_layer, no_process_groups, transformer_config

    ae = AnyExpertsConfig(k_min=1, k_max=3, k_rounding="dither", num_virtual_experts=2, rho_max=0.34,
                          budget_target=1.8)
    torch.manual_seed(0)
    layer = build_layer(transformer_config(), ae, pg_collection=no_process_groups())
    with torch.no_grad():
        layer.importance.fc2.bias.fill_(math.log(0.4 / 0.6))  # w near 0.4: K is 1 or 2 by position
        layer.importance.fc2.weight.normal_(0, 0.5)
    layer.eval()
    hidden_SBH = torch.randn(24, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), routing_trace() as trace:
        layer(hidden_SBH)
        layer(hidden_SBH[:, :2])
        layer(hidden_SBH[:, 2:])
    whole, first, second = ({k: v.view(24, -1, *v.shape[1:]) for k, v in r.items() if torch.is_tensor(v)}
                            for r in trace)
    assert whole["k"].unique().numel() > 1, "K should vary, or the comparison is vacuous"
    for name in ("k", "expert_ids", "virtual_mask"):
        assert torch.equal(whole[name], torch.cat([first[name], second[name]], dim=1)), name
    torch.testing.assert_close(whole["gates"], torch.cat([first["gates"], second["gates"]], dim=1))
    # The positions come from the [S, B, H] shape: the router alone cannot guess them.
    with pytest.raises(ValueError, match="position_T"):
        layer.router.route(torch.zeros(3, 6, dtype=torch.float64), torch.full((3,), 0.4))


def test_excess_virtual_picks_are_replaced_by_next_best_real():
    # E = 3 real (ids 0..2), V = 2 virtual (ids 3, 4); the two virtual entries rank first.
    logits = torch.tensor([[1.0, 0.5, 0.1, 5.0, 4.0]])
    entries = select_slots(logits, torch.tensor([3]), torch.tensor([1]), num_experts=3, k_max=3)
    assert entries.tolist() == [[3, 0, 1]]  # one virtual allowed, then the best two real
    entries = select_slots(logits, torch.tensor([3]), torch.tensor([0]), num_experts=3, k_max=3)
    assert entries.tolist() == [[0, 1, 2]]


def test_importance_predictor_range_and_gradient():
    torch.manual_seed(0)
    predictor = ImportancePredictor(hidden_size=8, importance_hidden_size=4,
                                    init_method=lambda w: torch.nn.init.normal_(w, std=0.5))
    hidden = torch.randn(6, 8)
    w = predictor(hidden)
    assert w.shape == (6,) and w.dtype == torch.float32 and ((w > 0) & (w < 1)).all()
    w.sum().backward()
    assert predictor.fc1.weight.grad.abs().sum() > 0


@SETTINGS
@given(routing_cases(), st.sampled_from([0.05, 0.5, 1.0, 1.5]))
def test_capacity_drops_least_important_and_loses_nothing_silently(case, capacity_factor):
    cfg, num_experts, logits, importance, _ = case
    _, _, entries = route(cfg, num_experts, logits, importance)
    real = entries.masked_fill(entries >= num_experts, -1)
    plan = apply_capacity(real, importance, num_experts=num_experts, capacity_factor=capacity_factor)
    num_real = int((real >= 0).sum())
    kept = plan.expert_TK >= 0
    assert int(kept.sum()) + int(plan.num_dropped) == num_real
    assert not (kept & plan.dropped_TK).any()
    assert ((plan.expert_TK < num_experts)).all(), "a virtual id reached the dispatch ids"
    assert torch.equal(plan.expert_TK[kept], real[kept])
    capacity = math.ceil(capacity_factor * num_real / num_experts)
    assert int(plan.capacity) == capacity
    kept_counts = count_per_expert(plan.expert_TK, num_experts=num_experts)
    assert (kept_counts <= capacity).all()
    token_importance = importance.unsqueeze(-1).expand_as(real)
    for expert in range(num_experts):
        dropped_w = token_importance[plan.dropped_TK & (real == expert)]
        kept_w = token_importance[kept & (real == expert)]
        if len(dropped_w):
            assert int(kept_counts[expert]) == capacity, "dropped below capacity"
            assert kept_w.min() >= dropped_w.max(), "a more important token was dropped"


def test_capacity_none_and_tie_break_by_token_order():
    real = torch.tensor([[0, -1], [0, 1], [0, -1]])
    plan = apply_capacity(real, torch.rand(3), num_experts=2, capacity_factor=None)
    assert plan.capacity is None and int(plan.num_dropped) == 0 and torch.equal(plan.expert_TK, real)
    # 4 real slots over 2 experts, factor 0.5 -> capacity 1; equal importance keeps token 0.
    plan = apply_capacity(real, torch.full((3,), 0.5), num_experts=2, capacity_factor=0.5)
    assert plan.expert_TK.tolist() == [[0, -1], [-1, 1], [-1, -1]]
    assert int(expert_capacity(torch.tensor(4), num_experts=2, capacity_factor=0.5)) == 1


@SETTINGS
@given(routing_cases())
def test_virtual_slots_never_reach_the_dispatcher(case):
    from anyexperts.moe.dispatcher import VariableSlotAllToAll

    cfg, num_experts, logits, importance, gate_norm = case
    _, _, entries = route(cfg, num_experts, logits, importance)
    real = entries.masked_fill(entries >= num_experts, -1)
    gates = compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm)
    hidden = torch.randn(len(entries), 4, dtype=torch.float64)
    dispatcher = VariableSlotAllToAll(num_experts=num_experts, ep_group=None)
    rows, tokens_per_expert, probs = dispatcher.dispatch(hidden, real, gates)
    assert int(tokens_per_expert.sum()) == int((real >= 0).sum()) == len(rows)
    assert torch.equal(tokens_per_expert, count_per_expert(real, num_experts=num_experts, dtype=torch.int64))
    # The rows are exactly the real slots' gates: no virtual gate travelled.
    torch.testing.assert_close(probs.sort().values, gates[real >= 0].sort().values)


# ------------------------------------------------------------------------------------ losses

def test_load_balance_and_z_loss_match_megatron_with_fixed_k():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func, z_loss_func

    torch.manual_seed(1)
    num_tokens, num_experts, topk = 10, 6, 2
    logits = torch.randn(num_tokens, num_experts, dtype=torch.float64)
    entries = logits.topk(topk, dim=-1).indices
    counts = count_per_expert(entries, num_experts=num_experts, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    ours = load_balance_loss(probs, counts, counts.sum(), num_tokens_in_scope=num_tokens)
    theirs = switch_load_balancing_loss_func(probs, counts, num_tokens, topk, num_experts, 1.0)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(z_loss(logits), z_loss_func(logits, 1.0))
    # Perfect balance gives exactly 1.
    uniform = torch.full((num_tokens, num_experts), 1.0 / num_experts, dtype=torch.float64)
    flat = torch.full((num_experts,), 5.0, dtype=torch.float64)
    torch.testing.assert_close(load_balance_loss(uniform, flat, flat.sum(), num_tokens_in_scope=num_tokens),
                               torch.tensor(1.0, dtype=torch.float64))


def _aux_inputs(seed, num_tokens=8, num_experts=4, k=2):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts + 1, generator=gen, requires_grad=True)
    importance = torch.rand(num_tokens, generator=gen).requires_grad_(True)
    real = logits.detach()[:, :num_experts].topk(k, dim=-1).indices
    # The count the budget holds (in fractional training, what evaluation would select).
    num_real_counted = torch.randint(1, 4, (num_tokens,), generator=gen)
    return dict(logits_TX=logits, real_expert_TK=real, importance_T=importance, num_real_counted_T=num_real_counted)


def test_aux_loss_terms_micro_batch_values_and_budget_gradient():
    cfg = AnyExpertsConfig(k_min=1, k_max=3, budget_target=2.0, budget_coeff=1.0, z_loss_coeff=0.5,
                           load_balance_coeff=0.25)
    terms = AuxLossTerms(cfg, num_experts=4)
    inputs = _aux_inputs(0)
    aux = terms(**inputs)
    logits, importance = inputs["logits_TX"], inputs["importance_T"]
    counts = count_per_expert(inputs["real_expert_TK"], num_experts=4)
    expected_lb = load_balance_loss(torch.softmax(logits[:, :4], -1), counts, counts.sum(), num_tokens_in_scope=8)
    torch.testing.assert_close(aux.load_balance, expected_lb.detach())
    torch.testing.assert_close(aux.z, z_loss(logits).detach())
    # The budget counts real slots as computed: ((mean count - target) / span)^2, span 2.
    deviation = (inputs["num_real_counted_T"].double().mean() - 2.0) / 2
    torch.testing.assert_close(aux.budget, (deviation ** 2).float())
    # The attached term pushes every w by 2 * deviation / T (a controller on the count).
    aux.attached.backward()
    expected_grad = 2 * deviation / 8
    torch.testing.assert_close(importance.grad, torch.full((8,), float(expected_grad)))


def test_budget_term_also_pushes_the_virtual_mass():
    # Over budget, the term asks for fewer slots (w down) and more virtual slots (q up).
    cfg = AnyExpertsConfig(k_min=1, k_max=3, budget_target=1.5, budget_coeff=1.0, z_loss_coeff=0.0,
                           load_balance_coeff=0.0, num_virtual_experts=1, rho_max=0.5)
    inputs = _aux_inputs(3)
    num_slots = torch.full((8,), 3)
    aux = AuxLossTerms(cfg, num_experts=4)(**inputs, num_slots_T=num_slots)
    aux.attached.backward()
    deviation = float(inputs["num_real_counted_T"].double().mean() - 1.5) / 2
    assert deviation > 0
    logits = inputs["logits_TX"].detach().clone().requires_grad_(True)
    virtual_mass = torch.softmax(logits, -1)[:, 4]
    expected = (2 * deviation * (-(virtual_mass * 3 / 2)).sum() / 8)
    expected.backward()
    torch.testing.assert_close(inputs["logits_TX"].grad, logits.grad)
    assert torch.all(inputs["logits_TX"].grad[:, 4] < 0)  # descent raises every virtual logit
    assert torch.all(inputs["importance_T"].grad > 0)      # and lowers every w
    # Switched off, the logits get no budget gradient.
    off = _aux_inputs(3)
    cfg_off = AnyExpertsConfig(**{**cfg.__dict__, "budget_on_virtual": False})
    AuxLossTerms(cfg_off, num_experts=4)(**off, num_slots_T=num_slots).attached.backward()
    assert off["logits_TX"].grad is None or torch.all(off["logits_TX"].grad == 0)


def test_global_batch_scope_accumulates_over_micro_batches_until_reset():
    cfg = AnyExpertsConfig(k_min=2, k_max=2, load_balance_scope="global_batch", z_loss_coeff=0.0,
                           budget_coeff=0.0)
    layer = torch.nn.Module()
    layer.aux = AuxLossTerms(cfg, num_experts=4)
    first, second = _aux_inputs(1), _aux_inputs(2)
    layer.aux(**first)
    aux = layer.aux(**second)
    counts = sum(count_per_expert(x["real_expert_TK"], num_experts=4) for x in (first, second))
    probs = torch.softmax(second["logits_TX"][:, :4], -1)
    torch.testing.assert_close(aux.load_balance,
                               load_balance_loss(probs, counts, counts.sum(), num_tokens_in_scope=8).detach())
    reset_global_batch_state(layer)
    aux = layer.aux(**second)
    counts = count_per_expert(second["real_expert_TK"], num_experts=4)
    torch.testing.assert_close(aux.load_balance,
                               load_balance_loss(probs, counts, counts.sum(), num_tokens_in_scope=8).detach())


# ------------------------------------------------------------------------------------ stats

def test_stats_sink_mean_sum_and_reset():
    from anyexperts.moe.stats import StatsSink

    sink = StatsSink()
    sink.record(1, "importance_mean", torch.tensor(0.2))
    sink.record(1, "importance_mean", torch.tensor(0.4))
    sink.record(2, "importance_mean", torch.tensor(1.0))
    sink.record(1, "k_histogram", torch.tensor([1.0, 2.0]), reduction="sum")
    sink.record(1, "k_histogram", torch.tensor([3.0, 0.0]), reduction="sum")
    sink.record(1, "tokens_per_expert", torch.tensor([2.0, 6.0]))
    out = sink.collect()
    torch.testing.assert_close(out["importance_mean"][1], torch.tensor(0.3))
    torch.testing.assert_close(out["importance_mean"][2], torch.tensor(1.0))
    torch.testing.assert_close(out["k_histogram"][1], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(out["load_imbalance_global"][1], torch.tensor(1.5))
    with pytest.raises(ValueError, match="reduction"):
        sink.record(1, "x", torch.tensor(1.0), reduction="max")
    sink.reset()
    assert sink.collect() == {}


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("kwargs, field", [
    (dict(k_min=3, k_max=2), "k_min"),
    (dict(k_min=0, k_max=2), "k_min"),
    (dict(rho_max=1.0), "rho_max"),
    (dict(rho_max=-0.1), "rho_max"),
    (dict(k_min=2, k_max=4, budget_target=1.5), "budget_target"),
    (dict(k_min=2, k_max=4, budget_target=4.5), "budget_target"),
    (dict(num_virtual_experts=0, rho_max=0.25), "num_virtual_experts"),
    (dict(budget_scope="step"), "budget_scope"),
    (dict(gate_norm="virtual"), "gate_norm"),
    (dict(virtual_kind="noise"), "virtual_kind"),
    (dict(k_rounding="stochastic"), "k_rounding"),
    (dict(k_rounding="round"), "k_rounding"),
    (dict(budget_bias_rate=-0.1, budget_target=2.0), "budget_bias_rate"),
    (dict(budget_bias_rate=0.1), "budget_bias_rate"),
    (dict(virtual_bias_rate=0.5), "virtual_bias_rate"),
    (dict(virtual_target=0.2), "virtual_bias_rate"),
    (dict(virtual_target=0.2, virtual_bias_rate=-0.5), "virtual_bias_rate"),
    (dict(k_min=1, k_max=3, rho_max=0.34, virtual_target=1.5, virtual_bias_rate=0.5), "virtual_target"),
    (dict(k_min=1, k_max=3, rho_max=0.34, virtual_target=-0.1, virtual_bias_rate=0.5), "virtual_target"),
])
def test_bad_configs_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^moe\.anyexperts\.{field}="):
        AnyExpertsConfig(**kwargs).validate(num_experts=8, prefix="moe.anyexperts.")


def test_reduction_config_is_valid_with_no_virtual_experts():
    AnyExpertsConfig(k_min=2, k_max=2, num_virtual_experts=0, rho_max=0.0).validate(num_experts=4)


def test_virtual_straight_through_changes_no_gate_and_tells_the_virtual_logit_the_last_slots_worth():
    from anyexperts.moe.router import virtual_straight_through_mass

    num_experts, num_virtual, k_max, rho_max = 6, 2, 3, 0.5
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(400, num_experts + num_virtual, generator=gen, dtype=torch.float64)
    num_slots = torch.randint(1, k_max + 1, (400,), generator=gen)
    max_virtual = max_virtual_table(rho_max=rho_max, k_max=k_max)[num_slots]
    entries = select_slots(logits, num_slots, max_virtual, num_experts=num_experts, k_max=k_max)
    weights = torch.randn(400, k_max, generator=gen, dtype=torch.float64)
    for gate_norm in ("all", "real"):
        leaf = logits.clone().requires_grad_(True)
        mass = virtual_straight_through_mass(leaf, entries, num_slots, max_virtual, None, num_experts=num_experts)
        gates = compute_gates(leaf, entries, num_experts=num_experts, gate_norm=gate_norm, last_slot_mass_T=mass,
                              num_slots_T=num_slots)
        torch.testing.assert_close(gates, compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm))
        (gates * weights).sum().backward()
        # dL/dm of the last slot, with the mass as a leaf of value 1.
        unit = torch.ones(400, dtype=torch.float64, requires_grad=True)
        (compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm, last_slot_mass_T=unit,
                       num_slots_T=num_slots) * weights).sum().backward()
        has_virtual = (entries >= num_experts).any(-1)
        eligible = (max_virtual >= 1) & ~has_virtual
        assert eligible.sum() > 50 and has_virtual.sum() > 20, "both kinds of token must occur"
        rows = torch.arange(400)
        best = num_experts + logits[:, num_experts:].argmax(-1)
        last = entries[rows, num_slots - 1]
        pi = torch.sigmoid(logits[rows, best] - logits[rows, last.clamp(min=0)])
        # What the plain gates give every logit (selected virtual entries have gates of their own).
        plain = logits.clone().requires_grad_(True)
        (compute_gates(plain, entries, num_experts=num_experts, gate_norm=gate_norm) * weights).sum().backward()
        extra = leaf.grad - plain.grad
        expected = torch.where(eligible, -unit.grad * pi * (1 - pi), torch.zeros_like(pi))
        torch.testing.assert_close(extra[rows, best], expected)
        # The other virtual logit gets nothing extra (it takes no part in the comparison).
        other = num_experts + (1 - (best - num_experts))
        torch.testing.assert_close(extra[rows, other], torch.zeros_like(pi))
        assert torch.all(expected[eligible] != 0)
