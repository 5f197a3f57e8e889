"""The learned slot allocations (anyexperts/moe/allocation.py) and what measures them.

    OMP_NUM_THREADS=1 python -m pytest tests/test_allocation.py -q

- fractional: the gradient that reaches every token's w from the loss equals a central
  finite difference (float64, one layer, no fusion or budget: the slot decision is w's only
  path); the output is continuous where kappa crosses an integer; training equals
  evaluation where kappa is an integer.
- straight_through: only tokens that the dither rounded up get a loss gradient on w.
- property tests (hypothesis) for both modes, training and evaluation: K in [k_min, k_max],
  virtual slots within floor(rho_max K), gates non-negative, the last slot's gate m times
  what a whole slot would get.
- the budget term alone drives the real slots evaluation computes to the target.
- statistics derived from summed moments (k_std, k_off_mode_frac, k_position_corr), the
  Spearman helper, and the shuffled-allocation diagnostic (same K multiset, new owners).
Layers are built in this process with no process groups (as the dither layout test does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anyexperts.moe import allocation, stats
from anyexperts.moe.allocation import allocate_slots, fractional_slots
from anyexperts.moe.config import AnyExpertsConfig
from anyexperts.moe.router import compute_gates, max_virtual_table, select_slots
from anyexperts.training.allocation_eval import spearman

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _layer(ae: AnyExpertsConfig, *, num_experts: int = 4, seed: int = 0):
    from tests.test_anyexperts_layer import build_layer, no_process_groups, transformer_config

    groups = no_process_groups()
    torch.manual_seed(seed)
    layer = build_layer(transformer_config(num_moe_experts=num_experts), ae, pg_collection=groups)
    with torch.no_grad():
        for p in layer.parameters():  # larger weights than the init: expert outputs that matter
            p.mul_(6.0)
    return layer


def _learned_config(mode: str, **overrides) -> AnyExpertsConfig:
    kwargs = dict(k_min=1, k_max=3, k_rounding=mode, num_virtual_experts=2, rho_max=0.5, virtual_kind="copy",
                  gate_norm="all", alpha=0.0, learn_alpha=False, load_balance_coeff=0.0, budget_coeff=0.0,
                  z_loss_coeff=0.0)
    kwargs.update(overrides)
    return AnyExpertsConfig(**kwargs)


class _FixedImportance(torch.nn.Module):
    """Stands in for the importance MLP: returns a given w (a leaf tensor) for every forward."""

    controls_budget = False
    scale_loss = None

    def __init__(self, importance_T: torch.Tensor) -> None:
        super().__init__()
        self.importance_T = importance_T

    def forward(self, hidden_TH):
        return self.importance_T


def _loss_and_slots(layer, hidden_SBH, weight_SBH, importance_T):
    from anyexperts.moe.trace import routing_trace

    layer.importance = _FixedImportance(importance_T)
    with routing_trace() as trace:
        out, _ = layer(hidden_SBH)
    return (out * weight_SBH).sum(), trace[0]["k"]


@pytest.mark.parametrize("gate_norm", ["all", "real"])
def test_fractional_gradient_to_importance_matches_finite_differences(gate_norm):
    layer = _layer(_learned_config("fractional", gate_norm=gate_norm))
    layer.train()
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 2, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 2, 16, generator=gen, dtype=torch.float64)
    importance = torch.rand(12, generator=gen, dtype=torch.float64)
    # kappa = 1 + 2 w crosses an integer at w = 0.5: keep every token away from it.
    importance = torch.where((importance - 0.5).abs() < 0.05, importance + 0.1, importance)
    w = importance.clone().requires_grad_(True)
    loss, slots = _loss_and_slots(layer, hidden, weight, w)
    (grad_T,) = torch.autograd.grad(loss, w)
    assert set(slots.tolist()) == {2, 3}, "both slot counts should occur, or the check is narrow"
    eps = 1e-6
    numeric_T = torch.empty_like(grad_T)
    for i in range(w.numel()):
        with torch.no_grad():
            up, down = importance.clone(), importance.clone()
            up[i] += eps
            down[i] -= eps
            loss_up, slots_up = _loss_and_slots(layer, hidden, weight, up)
            loss_down, slots_down = _loss_and_slots(layer, hidden, weight, down)
        assert torch.equal(slots_up, slots) and torch.equal(slots_down, slots)
        numeric_T[i] = (loss_up - loss_down) / (2 * eps)
    assert grad_T.abs().min() > 1e-3, "every token's w must get a loss gradient"
    torch.testing.assert_close(grad_T, numeric_T, rtol=1e-6, atol=1e-8)


def test_fractional_output_is_continuous_across_an_integer_and_equals_eval_there():
    layer = _layer(_learned_config("fractional"))
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 2, 16, generator=gen, dtype=torch.float64)

    def output(w_value: float, *, training: bool):
        layer.train(training)
        with torch.no_grad():
            layer.importance = _FixedImportance(torch.full((10,), w_value, dtype=torch.float64))
            return layer(hidden)[0]

    delta = 1e-7  # kappa = 1 + 2 w: 2 - 2e-7 (2 slots, mass ~1) and 2 + 2e-7 (3 slots, mass ~0)
    below, above = output(0.5 - delta, training=True), output(0.5 + delta, training=True)
    jump = output(0.25, training=True) - output(0.5, training=True)
    assert (below - above).abs().max() < 1e-4 * jump.abs().max()
    # At an integer kappa training selects the same whole slots evaluation does.
    torch.testing.assert_close(output(0.5, training=True), output(0.5, training=False), rtol=1e-12, atol=1e-12)


def test_straight_through_gradient_reaches_only_tokens_rounded_up():
    layer = _layer(_learned_config("straight_through"))
    layer.train()
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(16, 1, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(16, 1, 16, generator=gen, dtype=torch.float64)
    w = torch.full((16,), 0.3, dtype=torch.float64, requires_grad=True)  # kappa 1.6: 1 or 2 by position
    loss, slots = _loss_and_slots(layer, hidden, weight, w)
    (grad_T,) = torch.autograd.grad(loss, w)
    rounded_up = slots == 2
    assert rounded_up.any() and (~rounded_up).any()
    assert torch.all(grad_T[~rounded_up] == 0)
    assert torch.all(grad_T[rounded_up] != 0)
    # Evaluation computes the same slots as training.
    layer.eval()
    with torch.no_grad():
        _, eval_slots = _loss_and_slots(layer, hidden, weight, w.detach())
    assert torch.equal(eval_slots, slots)


@st.composite
def learned_cases(draw):
    num_experts = draw(st.integers(1, 8))
    num_virtual = draw(st.integers(0, 3))
    rho_max = 0.0 if num_virtual == 0 else draw(st.sampled_from([0.0, 0.25, 0.34, 0.5, 0.75]))
    k_min = draw(st.integers(1, 4))
    k_max = draw(st.integers(k_min, 7))
    mode = draw(st.sampled_from(["fractional", "straight_through"]))
    cfg = AnyExpertsConfig(k_min=k_min, k_max=k_max, k_rounding=mode, num_virtual_experts=num_virtual,
                           rho_max=rho_max)
    try:
        cfg.validate(num_experts=num_experts)
    except ValueError:
        assume(False)
    num_tokens = draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(num_tokens, num_experts + num_virtual, generator=gen, dtype=torch.float64) * 3
    importance = torch.rand(num_tokens, generator=gen, dtype=torch.float64)
    importance[0] = draw(st.sampled_from([0.0, 1.0, 0.5, float(importance[0])]))
    return cfg, num_experts, logits, importance, draw(st.sampled_from(["all", "real"])), draw(st.booleans())


@SETTINGS
@given(learned_cases())
def test_learned_allocations_keep_k_and_the_virtual_cap(case):
    cfg, num_experts, logits, importance, gate_norm, training = case
    positions = torch.arange(importance.numel())
    alloc = allocate_slots(importance, positions, cfg, training=training)
    for slots in (alloc.num_slots_T, alloc.num_slots_at_eval_T if alloc.num_slots_at_eval_T is not None
                  else alloc.num_slots_T):
        assert slots.min() >= cfg.k_min and slots.max() <= cfg.k_max
    max_virtual = max_virtual_table(rho_max=cfg.rho_max, k_max=cfg.k_max)[alloc.num_slots_T]
    entries = select_slots(logits, alloc.num_slots_T, max_virtual, num_experts=num_experts, k_max=cfg.k_max)
    assert torch.equal((entries >= 0).sum(-1), alloc.num_slots_T)
    assert torch.all((entries >= num_experts).sum(-1) <= max_virtual)
    gates = compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm,
                          last_slot_mass_T=alloc.last_slot_mass_T, num_slots_T=alloc.num_slots_T)
    assert torch.all(gates >= 0) and torch.all(gates[entries < 0] == 0)
    if gate_norm == "all":
        assert torch.all(gates.sum(-1) <= 1 + 1e-12)
    if alloc.last_slot_mass_T is not None:
        mass = alloc.last_slot_mass_T.detach()
        assert torch.all((mass >= 0) & (mass <= 1))
        whole = compute_gates(logits, entries, num_experts=num_experts, gate_norm=gate_norm)
        last = alloc.num_slots_T - 1
        rows = torch.arange(entries.shape[0])
        first_in_norm = (entries[:, 0] < num_experts) | (gate_norm == "all")
        # Relative to the first slot, the last one weighs m times what it would as a whole slot.
        last_in_norm = (entries[rows, last] < num_experts) | (gate_norm == "all")
        ok = first_in_norm & last_in_norm & (last > 0)
        ratio = gates[rows, last] / gates[:, 0]
        whole_ratio = whole[rows, last] / whole[:, 0]
        torch.testing.assert_close(ratio[ok], (mass * whole_ratio)[ok], rtol=1e-9, atol=1e-12)
    else:
        assert cfg.k_rounding == "straight_through" or not training or cfg.k_min == cfg.k_max


def test_fractional_slots_at_the_ends():
    slots, mass = fractional_slots(torch.tensor([0.0, 1.0, 0.25, 0.5], dtype=torch.float64), k_min=1, k_max=3)
    assert slots.tolist() == [1, 3, 2, 2]  # kappa 1, 3, 1.5, 2
    torch.testing.assert_close(mass, torch.tensor([1.0, 1.0, 0.5, 1.0], dtype=torch.float64))


def test_budget_term_alone_holds_the_real_slots_evaluation_computes():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    ae = _learned_config("fractional", budget_coeff=1.0, budget_target=1.8, rho_max=0.34)
    layer = _layer(ae)
    layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, dtype=torch.float64))
    hidden = torch.randn(32, 4, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.importance.parameters(), lr=0.02)
    counts = []
    for _ in range(150):
        optimizer.zero_grad()
        with stats.separate_sink() as sink:
            out, _ = layer(hidden)
            (out.sum() * 0).backward()  # the budget term is the only gradient
        optimizer.step()
        counts.append(float(sink.collect()["real_experts_per_token_at_eval"][1]))
    assert abs(counts[0] - 1.8) > 0.05, "the start must be off target, or the test shows nothing"
    held = float(np.mean(counts[-30:]))
    assert abs(held - 1.8) <= 0.02 * 1.8, counts[-30:]


@pytest.mark.parametrize("mode", ["straight_through", "fractional"])
def test_integral_budget_controller_alone_holds_the_target(mode):
    from anyexperts.moe.losses import update_selection_biases

    ae = _learned_config(mode, budget_bias_rate=0.5, budget_target=1.8, rho_max=0.34)
    layer = _layer(ae)
    layer.train()
    hidden = torch.randn(32, 4, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    counts = []
    for _ in range(120):
        with stats.separate_sink() as sink:
            layer(hidden)  # training forwards (grad mode) count for the controller
        name = "real_experts_per_token_at_eval" if mode == "fractional" else "real_experts_per_token"
        counts.append(float(sink.collect()[name][1]))
        update_selection_biases(layer)
    assert abs(counts[0] - 1.8) > 0.05, "the start must be off target, or the test shows nothing"
    assert abs(float(np.mean(counts[-30:])) - 1.8) <= 0.02 * 1.8, counts[-30:]
    assert float(layer.importance.logit_offset) != 0.0
    # The offset is saved with the model (a resumed run continues with it).
    assert "importance.logit_offset" in layer.state_dict()


@pytest.mark.parametrize("logit_std", [None, 2.0])
def test_standardised_logit_lets_the_controller_reach_saturated_importance(logit_std):
    from anyexperts.moe.losses import update_selection_biases

    ae = _learned_config("straight_through", budget_bias_rate=0.5, budget_target=1.8, rho_max=0.34,
                         importance_logit_std=logit_std)
    layer = _layer(ae)
    layer.train()
    hidden = torch.randn(32, 4, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    predictor = layer.importance
    with torch.no_grad():
        # What a learned allocation does to the logits: most tokens far from 0, w ~ 0 or 1
        # (measured in the first layer: half the tokens below logit -8, a quarter above +8).
        raw = predictor.fc2(torch.nn.functional.silu(predictor.fc1(hidden.reshape(-1, 16)))).squeeze(-1)
        predictor.fc2.weight.mul_(10.0 / raw.std())
        predictor.fc2.bias.add_(-20.0 - float(raw.mean() * 10.0 / raw.std()))
        raw = predictor.fc2(torch.nn.functional.silu(predictor.fc1(hidden.reshape(-1, 16)))).squeeze(-1)
    counts = []
    for _ in range(60):
        with stats.separate_sink() as sink:
            layer(hidden)
        counts.append(float(sink.collect()["real_experts_per_token"][1]))
        update_selection_biases(layer)
    assert abs(counts[0] - 1.8) > 0.2, counts[0]
    held = abs(float(np.mean(counts[-20:])) - 1.8) <= 0.02 * 1.8
    # Raw, 60 steps of the controller leave the count far off; standardised, it holds.
    assert held == (logit_std is not None), (counts[0], counts[-20:], float(predictor.logit_offset))
    if logit_std is not None:
        # The statistics are the last step's mean and std of the raw logits (the MLP is fixed here).
        assert abs(float(predictor.logit_mean) - float(raw.mean())) < 1e-4 * float(raw.abs().max())
        assert abs(float(predictor.logit_scale) / float(raw.std(correction=0)) - 1) < 1e-5
        assert {"importance.logit_mean", "importance.logit_scale"} <= layer.state_dict().keys()
        # Evaluation forwards neither count nor move them.
        layer.eval()
        with torch.no_grad():
            layer(hidden)
        assert float(predictor.logit_moments.abs().sum()) == 0.0


def test_slot_statistics_from_moments_match_numpy():
    gen = np.random.default_rng(0)
    k = gen.integers(1, 4, size=200)
    positions = np.tile(np.arange(50), 4)
    k[positions > 40] = 3  # some correlation with position
    with stats.separate_sink() as sink:
        for part in (slice(0, 120), slice(120, 200)):  # two forwards sum up
            k_T = torch.from_numpy(k[part])
            stats.record_slot_moments(1, k_T, torch.from_numpy(positions[part]))
            histogram = torch.bincount(k_T - 1, minlength=3).double()
            stats.record(1, "k_histogram", histogram, reduction="sum")
        out = sink.collect()
    assert "k_slot_moments" not in out
    assert abs(float(out["k_std"][1]) - k.std()) < 1e-5
    assert abs(float(out["k_position_corr"][1]) - np.corrcoef(k, positions)[0, 1]) < 1e-5
    mode_share = np.bincount(k).max() / k.size
    assert abs(float(out["k_off_mode_frac"][1]) - (1 - mode_share)) < 1e-6
    # Constant K: no spread and no correlation (0, not NaN).
    with stats.separate_sink() as sink:
        stats.record_slot_moments(2, torch.full((10,), 2), torch.arange(10))
        out = sink.collect()
    assert float(out["k_std"][2]) == 0.0 and float(out["k_position_corr"][2]) == 0.0


def test_spearman_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert abs(spearman(a, torch.tensor([10.0, 20.0, 40.0, 30.0])) - 0.8) < 1e-12  # 1 - 6*2/(4*15)
    assert abs(spearman(a, -a) + 1.0) < 1e-12
    assert spearman(a, torch.ones(4)) == 0.0


def test_shuffled_allocation_moves_k_between_tokens_at_evaluation_only():
    from anyexperts.moe.trace import routing_trace

    layer = _layer(_learned_config("fractional"))
    with torch.no_grad():
        layer.importance.fc2.weight.normal_(0, 3.0)  # w that varies by token
    hidden = torch.randn(16, 4, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    layer.eval()
    with torch.no_grad(), routing_trace() as trace:
        layer(hidden)
        with allocation.shuffled_allocation(seed=1):
            layer(hidden)
    own, shuffled = trace[0]["k"], trace[1]["k"]
    assert own.unique().numel() > 1
    assert torch.equal(own.sort().values, shuffled.sort().values)  # same compute
    assert not torch.equal(own, shuffled)                           # other owners
    # The capacity order and fusion keep each token's own w.
    torch.testing.assert_close(trace[0]["importance"], trace[1]["importance"])
    # Training never shuffles: the diagnostic cannot leak into a training step.
    layer.train()
    with torch.no_grad(), routing_trace() as trace:
        layer(hidden)
        with allocation.shuffled_allocation(seed=1):
            layer(hidden)
    assert torch.equal(trace[0]["k"], trace[1]["k"])


def test_scale_loss_holds_the_raw_importance_logit_near_unit_scale():
    ae = _learned_config("straight_through", budget_bias_rate=0.5, budget_target=1.8, rho_max=0.34,
                         importance_logit_std=2.0, importance_scale_coeff=1.0)
    layer = _layer(ae)
    layer.train()
    predictor = layer.importance
    hidden = torch.randn(32, 4, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        predictor.fc2.weight.mul_(30.0)
        predictor.fc2.bias.fill_(-5.0)

    def raw_logit():
        with torch.no_grad():
            return predictor.fc2(torch.nn.functional.silu(predictor.fc1(hidden.reshape(-1, 16)))).squeeze(-1)

    start = raw_logit()
    assert start.std() > 3 and start.mean() < -2
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        layer(hidden)
        penalty = predictor.scale_loss
        assert penalty is not None and penalty.requires_grad
        penalty.backward()
        optimizer.step()
    end = raw_logit()
    assert abs(float(end.mean())) < 0.2 and abs(float(end.std()) - 1) < 0.2, (end.mean(), end.std())
    # Evaluation forwards compute none.
    layer.eval()
    with torch.no_grad():
        layer(hidden)
    assert predictor.scale_loss is None
