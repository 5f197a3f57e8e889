"""The rival routing methods (anyexperts/moe/routers/): top-p and ReMoE, their budget
controller, their configs, and the layer built around them, in this process (no spawn).

    OMP_NUM_THREADS=1 python -m pytest tests/test_rival_routers.py -q
"""

from __future__ import annotations

import pytest
import torch

from anyexperts.config import TrainConfig, validate
from anyexperts.moe.config import ReMoEConfig, TopPConfig
from anyexperts.moe.routers.budget import RealExpertsController, update_count_controllers
from anyexperts.moe.routers.relu import active_entries, l1_penalty
from anyexperts.moe.routers.topp import top_p_entries
from tests.test_anyexperts_layer import build_layer, no_process_groups, transformer_config

NUM_EXPERTS = 8


# ------------------------------------------------------------------------ selection rules

def test_top_p_takes_the_minimal_prefix_that_reaches_p():
    probs_TE = torch.tensor([[0.05, 0.5, 0.3, 0.15]] * 5, dtype=torch.float64)
    expected = {0.3: [1], 0.5: [1], 0.6: [1, 2], 0.8: [1, 2], 0.81: [1, 2, 3], 1.0: [1, 2, 3, 0]}
    for top_p, experts in expected.items():
        entry_TK = top_p_entries(probs_TE, top_p, max_experts=4)
        assert entry_TK[0].tolist() == experts + [-1] * (4 - len(experts)), top_p
    # max_experts cuts the prefix.
    assert top_p_entries(probs_TE, 1.0, max_experts=2)[0].tolist() == [1, 2]


def test_top_p_matches_a_brute_force_prefix_search():
    gen = torch.Generator().manual_seed(3)
    probs_TE = torch.softmax(3 * torch.randn(200, NUM_EXPERTS, generator=gen, dtype=torch.float64), dim=-1)
    for top_p in (0.05, 0.4, 0.77, 0.99):
        entry_TK = top_p_entries(probs_TE, top_p, max_experts=NUM_EXPERTS)
        for probs_E, entries in zip(probs_TE, entry_TK):
            ranked = probs_E.argsort(descending=True).tolist()
            num = next(m for m in range(1, NUM_EXPERTS + 1) if probs_E[ranked[:m]].sum() >= top_p)
            assert entries.tolist() == ranked[:num] + [-1] * (NUM_EXPERTS - num)


def test_relu_active_set_is_the_positive_gates_in_gate_order():
    gates_TE = torch.relu(torch.tensor([[0.3, -1.0, 0.0, 2.0], [-0.1, -0.2, -0.3, -0.4]], dtype=torch.float64))
    assert active_entries(gates_TE, max_experts=4).tolist() == [[3, 0, -1, -1], [-1, -1, -1, -1]]
    assert active_entries(gates_TE, max_experts=1).tolist() == [[3], [-1]]


def test_l1_penalty_plain_and_load_balanced():
    gates_TE = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    entry_TK = active_entries(gates_TE, max_experts=2)
    assert float(l1_penalty(gates_TE, entry_TK, balance=False)) == pytest.approx(3.0)
    # Expert 0 holds 2 of 3 active slots (weight 2 * 2/3), expert 1 one (weight 2/3).
    assert float(l1_penalty(gates_TE, entry_TK, balance=True)) == pytest.approx((4 / 3 * 4 + 2 / 3 * 2) / 2)


# ------------------------------------------------------------------------ the routers

def _router(routing_config, *, scale: float = 4.0):
    from anyexperts.moe.specs import get_anyexperts_moe_spec
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(0)
    config = transformer_config(num_moe_experts=NUM_EXPERTS)
    layer = build_module(get_anyexperts_moe_spec(routing_config), config=config, layer_number=1,
                         pg_collection=no_process_groups())
    with torch.no_grad():
        layer.router.weight.mul_(scale)
    return layer


def test_top_p_router_gates_are_the_raw_probabilities():
    layer = _router(TopPConfig(top_p=0.6, max_experts=5))
    hidden_TH = torch.randn(30, 16, dtype=torch.float64)
    routing = layer.router(hidden_TH)
    probs_TE = torch.softmax(hidden_TH @ layer.router.weight.t(), dim=-1)
    assert routing.entry_TK.shape == (30, 5) and not routing.is_virtual_TK.any()
    used_TK = routing.entry_TK >= 0
    assert torch.equal(routing.real_expert_TK, routing.entry_TK)
    assert torch.equal(routing.num_slots_T, used_TK.sum(-1)) and int(routing.num_slots_T.min()) >= 1
    expected_TK = probs_TE.gather(1, routing.entry_TK.clamp(min=0)).masked_fill(~used_TK, 0.0)
    torch.testing.assert_close(routing.gate_TK, expected_TK)
    # Not renormalised: a token's gates sum to its selected mass, at least p unless cut by max_experts.
    assert float(routing.gate_TK.sum(-1).max()) < 1.0
    entropy = -(probs_TE * probs_TE.log()).sum(-1).mean()
    torch.testing.assert_close(routing.router_loss, 1e-4 * entropy)


def test_relu_router_activates_the_positive_logits():
    layer = _router(ReMoEConfig(l1_coeff=0.5, l1_balance=False))
    hidden_TH = torch.randn(30, 16, dtype=torch.float64)
    routing = layer.router(hidden_TH)
    logits_TE = hidden_TH @ layer.router.weight.t()
    assert torch.equal(routing.num_slots_T, (logits_TE > 0).sum(-1))
    # Column 0 collects the unused slots (-1 + 1) and is cut off.
    active_TE = torch.zeros(30, NUM_EXPERTS + 1, dtype=torch.bool).scatter_(
        1, routing.entry_TK + 1, torch.ones_like(routing.entry_TK, dtype=torch.bool))[:, 1:]
    assert torch.equal(active_TE, logits_TE > 0)
    torch.testing.assert_close(routing.gate_TK.sum(-1), torch.relu(logits_TE).sum(-1))
    torch.testing.assert_close(routing.router_loss, 0.5 * torch.relu(logits_TE).sum(-1).mean())


@pytest.mark.parametrize("routing_config", [TopPConfig(top_p=0.5, entropy_coeff=0.1, target_real_experts=2.0),
                                            ReMoEConfig(l1_coeff=0.05, target_real_experts=2.0)],
                         ids=["topp", "remoe"])
def test_layer_trains_logs_and_steps_its_controller(routing_config):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import losses, stats

    layer = _router(routing_config)
    assert layer.importance is None  # the rivals need no importance predictor
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    stats.reset()
    hidden = torch.randn(16, 2, 16, dtype=torch.float64, requires_grad=True)
    out, _ = layer(hidden)
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    collected = stats.collect()
    stats.reset()
    measured = float(collected["real_experts_per_token"][1])
    assert float(collected["k_histogram"][1].sum()) == 32
    own_stat = "top_p" if isinstance(routing_config, TopPConfig) else "l1_coeff"
    assert own_stat in collected and ("entropy_loss" in collected or "l1_loss" in collected)
    before = float(layer.router.controller.value)
    losses.update_selection_biases(layer, group=None)
    after = float(layer.router.controller.value)
    assert measured != 2.0
    # More experts than the target: p falls, lambda rises (and the other way round).
    if isinstance(routing_config, TopPConfig):
        assert (after < before) == (measured > 2.0)
    else:
        assert (after > before) == (measured > 2.0)
    assert "router.controller.value" in layer.state_dict()  # saved with the model
    layer.bfloat16()
    assert layer.router.controller.value.dtype == torch.float64


# ------------------------------------------------------------------------ the controller

def test_controller_rules_move_the_right_way_and_clip():
    threshold = RealExpertsController(initial=0.5, target=2.0, rule="additive", rate=0.1, min_value=0.1,
                                      max_value=1.0, raises_count=True)
    threshold.count(torch.tensor([3, 3, 3, 3]))
    update_count_controllers([threshold])
    assert float(threshold.value) == pytest.approx(0.4)
    threshold.count(torch.tensor([1, 1]))
    update_count_controllers([threshold])
    assert float(threshold.value) == pytest.approx(0.5)
    update_count_controllers([threshold])  # no forwards: unchanged
    assert float(threshold.value) == pytest.approx(0.5)
    for _ in range(20):
        threshold.count(torch.tensor([8]))
        update_count_controllers([threshold])
    assert float(threshold.value) == pytest.approx(0.1)
    penalty = RealExpertsController(initial=1e-3, target=2.0, rule="multiplicative", rate=1.2, min_value=1e-6,
                                    max_value=1.0, raises_count=False)
    penalty.count(torch.tensor([4, 4]))
    update_count_controllers([penalty])
    assert float(penalty.value) == pytest.approx(1.2e-3)
    penalty.count(torch.tensor([1, 1]))
    update_count_controllers([penalty])
    assert float(penalty.value) == pytest.approx(1e-3)
    assert not RealExpertsController(initial=0.5, target=None, rule="additive", rate=0.1, min_value=0.0,
                                     max_value=1.0, raises_count=True).is_active


def test_threshold_controller_holds_the_target_on_fixed_routers():
    """Routers that do not learn: p alone must bring the mean count to the target."""
    gen = torch.Generator().manual_seed(0)
    probs_TE = torch.softmax(2 * torch.randn(512, NUM_EXPERTS, generator=gen, dtype=torch.float64), dim=-1)
    controller = RealExpertsController(initial=0.9, target=2.5, rule="additive", rate=0.02, min_value=1e-3,
                                       max_value=1.0, raises_count=True)
    counts = []
    for _ in range(300):
        num_real_T = (top_p_entries(probs_TE, controller.value[0], max_experts=NUM_EXPERTS) >= 0).sum(-1)
        counts.append(num_real_T.double().mean().item())
        controller.count(num_real_T)
        update_count_controllers([controller])
    assert counts[0] > 3.5  # p = 0.9 starts far above the target
    assert sum(counts[-50:]) / 50 == pytest.approx(2.5, abs=0.05)


def test_l1_coefficient_controller_holds_the_target_against_a_pull():
    """A toy ReLU router: the 'LM loss' pulls every logit up with force c, the L1 penalty
    lambda * mean active count pushes down; lambda must settle where the count is the target."""
    gen = torch.Generator().manual_seed(1)
    base_TE = torch.randn(512, NUM_EXPERTS, generator=gen, dtype=torch.float64)
    shift, pull, lr = torch.zeros((), dtype=torch.float64), 1.0, 0.01
    controller = RealExpertsController(initial=1e-8, target=2.0, rule="multiplicative", rate=1.2,
                                       min_value=1e-20, max_value=1e4, raises_count=False)
    counts = []
    for _ in range(600):
        gates_TE = torch.relu(base_TE + shift)
        num_real_T = (gates_TE > 0).sum(-1)
        counts.append(num_real_T.double().mean().item())
        # d/dshift of (-pull * shift + lambda * mean sum relu): -pull + lambda * mean active count.
        shift = shift - lr * (-pull + controller.value[0] * num_real_T.double().mean())
        controller.count(num_real_T)
        update_count_controllers([controller])
    assert counts[0] == pytest.approx(4.0, abs=0.5)
    assert sum(counts[-100:]) / 100 == pytest.approx(2.0, abs=0.2)


@pytest.mark.parametrize("threshold_rate", [0.0, 0.05])
def test_gate_shift_reopens_gates_the_loss_closed(threshold_rate):
    """A layer whose ReLU gates are all closed (every logit < 0, what the LM loss did to two
    layers early in a measured run): the L1 coefficient alone cannot reopen them (a closed gate
    has no gradient), the shift brings the count back to the target."""
    from anyexperts.moe import losses

    layer = _router(ReMoEConfig(l1_coeff=1e-8, target_real_experts=2.0, threshold_rate=threshold_rate))
    hidden_TH = torch.randn(256, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        logits_TE = hidden_TH @ layer.router.weight.t()
        layer.router.weight.mul_(0.5 / logits_TE.std())
        layer.router.bias = None
        shift = float((hidden_TH @ layer.router.weight.t()).max()) + 0.5
    layer.train()
    counts = []
    for _ in range(200):
        # Every logit below zero by a margin: what the closed layer sees.
        routing = layer.router.route(hidden_TH @ layer.router.weight.t() - shift)
        for controller in (layer.router.controller, layer.router.shift):
            if controller is not None:
                controller.count(routing.num_real_T)
        counts.append(float(routing.num_real_T.double().mean()))
        losses.update_selection_biases(layer, group=None)
    assert counts[0] == 0.0
    if threshold_rate == 0:
        assert max(counts) == 0.0  # lambda falls to its floor and nothing opens
        assert float(layer.router.l1_coeff) < 1e-8
        # The paper's router has no shift to save: its checkpoints load as before.
        assert layer.router.shift is None and "router.shift.value" not in layer.state_dict()
    else:
        assert sum(counts[-50:]) / 50 == pytest.approx(2.0, abs=0.2), counts[-50:]
        assert float(layer.router.shift.value) > 0
        assert "router.shift.value" in layer.state_dict()


# ------------------------------------------------------------------------ configs

@pytest.mark.parametrize("kind,changes,field", [
    ("topp", {"top_p": 0.0}, "top_p"),
    ("topp", {"top_p": 1.5}, "top_p"),
    ("topp", {"entropy_coeff": -1.0}, "entropy_coeff"),
    ("topp", {"p_update_rate": -0.1}, "p_update_rate"),
    ("topp", {"target_real_experts": 0.5}, "target_real_experts"),
    ("topp", {"target_real_experts": 9.0}, "target_real_experts"),
    ("topp", {"max_experts": 4, "target_real_experts": 5.0}, "target_real_experts"),
    ("topp", {"max_experts": 9}, "max_experts"),
    ("topp", {"load_balance_coeff": -0.01}, "load_balance_coeff"),
    ("remoe", {"l1_coeff": 0.0}, "l1_coeff"),
    ("remoe", {"l1_coeff_factor": 0.9}, "l1_coeff_factor"),
    ("remoe", {"target_real_experts": 0.0}, "target_real_experts"),
    ("remoe", {"capacity_factor": 0.0}, "capacity_factor"),
    ("remoe", {"z_loss_coeff": -1.0}, "z_loss_coeff"),
    ("remoe", {"threshold_rate": -0.1}, "threshold_rate"),
    ("remoe", {"threshold_rate": 0.1, "target_real_experts": None}, "threshold_rate"),
])
def test_bad_rival_values_name_the_field(kind, changes, field):
    cfg = TrainConfig()
    cfg.moe.kind = kind
    for name, value in changes.items():
        setattr(getattr(cfg.moe, kind), name, value)
    with pytest.raises(ValueError, match=rf"moe\.{kind}\.{field}="):
        validate(cfg, world_size=1)


def test_rival_configs_compose_from_the_moe_group():
    from tests.test_config import compose_cfg

    from anyexperts.config import to_dataclass

    for kind, config_cls in (("topp", TopPConfig), ("remoe", ReMoEConfig)):
        cfg = to_dataclass(compose_cfg("experiment=shakespeare_cpu", f"moe={kind}"))
        validate(cfg, world_size=2)
        assert cfg.moe.kind == kind and isinstance(cfg.moe.routing_config(), config_cls)
        assert cfg.moe.routing_config().target_real_experts == 2.0
