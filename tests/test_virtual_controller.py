"""The virtual slots' selection bias (virtual_target): it holds how many virtual slots are
taken, moves the selection only, and the loss still reaches the virtual logits through the
gates (gate_norm="all"), so which tokens take a virtual slot is learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyexperts.moe import stats
from anyexperts.moe.losses import update_selection_biases
from anyexperts.moe.router import compute_gates, sequence_positions
from tests.test_allocation import _layer, _learned_config


def _config(**overrides):
    kwargs = dict(rho_max=0.34, virtual_kind="zero", gate_norm="all", budget_target=1.8, budget_bias_rate=0.5,
                  importance_logit_std=2.0, virtual_target=0.3, virtual_bias_rate=0.5)
    kwargs.update(overrides)
    return _learned_config("straight_through", **kwargs)


def _hidden(seed: int = 8) -> torch.Tensor:
    return torch.randn(32, 4, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("target", [0.05, 0.3])
def test_virtual_bias_holds_the_target_beside_the_budget(target):
    layer = _layer(_config(virtual_target=target))
    layer.train()
    hidden = _hidden()
    virtual, real = [], []
    for _ in range(150):
        with stats.separate_sink() as sink:
            layer(hidden)
        collected = sink.collect()
        virtual.append(float(collected["virtual_experts_per_token"][1]))
        real.append(float(collected["real_experts_per_token"][1]))
        update_selection_biases(layer)
    assert abs(virtual[0] - target) > 0.03, "the start must be off target, or the test shows nothing"
    assert abs(float(np.mean(virtual[-30:])) - target) <= 0.02, virtual[-30:]
    # Both controllers at once: the real count stays on its budget too.
    assert abs(float(np.mean(real[-30:])) - 1.8) <= 0.02 * 1.8, real[-30:]
    assert float(layer.router.virtual_bias) != 0.0
    assert "router.virtual_bias" in layer.state_dict()  # a resumed run continues with it


def test_no_virtual_bias_buffer_without_a_target():
    layer = _layer(_config(virtual_target=None, virtual_bias_rate=0.0))
    assert not layer.router.controls_virtual
    assert "router.virtual_bias" not in layer.state_dict()


def test_virtual_bias_moves_the_selection_not_the_gates_and_the_loss_reaches_virtual_logits():
    layer = _layer(_config())
    layer.train()
    hidden = _hidden(3)
    hidden_TH = hidden.reshape(-1, 16)
    router = layer.router
    importance_T = layer.importance(hidden_TH).detach()
    position_T = sequence_positions(hidden.shape)
    logits_TX = router.gating(hidden_TH)
    router.virtual_bias.fill_(-50.0)
    none = router.route(logits_TX, importance_T, position_T)
    router.virtual_bias.fill_(50.0)
    most = router.route(logits_TX, importance_T, position_T)
    assert int(none.num_virtual_T.sum()) == 0
    allowed_T = router.max_virtual_by_k[most.num_slots_T]
    assert torch.equal(most.num_virtual_T, allowed_T)  # every token at its cap
    assert int(allowed_T.sum()) > 0
    # The gates are the router's own softmax over the selected entries: the bias is not in them.
    for routing in (none, most):
        expected_TK = compute_gates(logits_TX, routing.entry_TK, num_experts=router.num_experts, gate_norm="all",
                                    last_slot_mass_T=None, num_slots_T=routing.num_slots_T)
        uses_mass = routing.gate_TK.sum(-1) < expected_TK.sum(-1) - 1e-12  # straight-through last slot
        assert torch.allclose(routing.gate_TK[~uses_mass], expected_TK[~uses_mass], rtol=0, atol=1e-12)
    # With gates over every selected entry, a virtual slot dilutes the real ones: the loss
    # gradient reaches the virtual rows of the router, and only from tokens that took one.
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, _ = layer(hidden)
    (out * weight).sum().backward()
    virtual_grad = router.weight.grad[router.num_experts:]
    assert float(virtual_grad.abs().sum()) > 0
    router.weight.grad = None
    router.virtual_bias.fill_(-50.0)
    out, _ = layer(hidden)
    (out * weight).sum().backward()
    # No virtual slot taken: what reaches the virtual rows is only the aux losses' (none here).
    assert float(router.weight.grad[router.num_experts:].abs().sum()) == 0.0


@pytest.mark.gpu
def test_statistics_live_on_the_layer_device_for_one_all_reduce():
    """Untested here (no GPU on the CPU machines): stats.collect concatenates every recorded
    value before its all-reduce, and NCCL reduces device tensors only."""
    layer = _layer(_config()).cuda()
    layer.train()
    with stats.separate_sink() as sink:
        layer(_hidden().cuda())
    devices = {(name, value.device.type) for (name, _), value in sink._sums.items()}
    assert {device for _, device in devices} == {"cuda"}, sorted(devices)


def test_training_forwards_record_nothing_when_the_step_is_not_logged():
    from anyexperts.config import TrainConfig
    from anyexperts.training.trainer import _logs_step

    layer = _layer(_config())
    layer.train()
    try:
        stats.record_training(False)
        with stats.separate_sink(enabled=False) as sink:
            layer(_hidden())
        assert sink.collect() == {}
        stats.record_training(True)
        with stats.separate_sink(enabled=False) as sink:
            layer(_hidden())
        assert "real_experts_per_token" in sink.collect()
    finally:
        stats.record_training(True)
    cfg = TrainConfig()
    cfg.logging.log_interval, cfg.trainer.eval_interval, cfg.trainer.max_steps = 10, 25, 33
    assert [s for s in range(1, 34) if _logs_step(s, cfg)] == [1, 10, 20, 25, 30, 33]


def test_no_virtual_controller_where_no_slot_can_be_virtual():
    # moe=anyexperts holds a virtual target; the reduction to top-k (rho_max 0 or V = 0) must
    # still validate, with the controller off.
    for overrides in (dict(rho_max=0.0), dict(num_virtual_experts=0, rho_max=0.0)):
        ae = _config(**overrides)
        ae.validate(num_experts=4)
        assert not ae.holds_virtual_slots
        assert not _layer(ae).router.controls_virtual
    with pytest.raises(ValueError, match="virtual_target"):
        _config(virtual_target=1.5).validate(num_experts=4)  # at most floor(0.34 * 3) = 1 per token
