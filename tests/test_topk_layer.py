"""The project's top-k path (moe/topk_layer.py): megatron's MoELayer with the project's dispatcher
behind megatron's dispatcher interface. On every rank, outputs and gradients (input, router,
experts) must equal those of the same layer with megatron's MoEAlltoAllTokenDispatcher, up to
the order of the sums; at EP = 1 and EP = 2 (gloo)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_distributed


def _layer(num_experts: int, topk: int, capacity_factor=None):
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts.config import TrainConfig
    from anyexperts.model import layer_specs, transformer_config

    cfg = TrainConfig()
    cfg.model = dataclasses.replace(cfg.model, num_layers=1, hidden_size=32, num_attention_heads=1)
    cfg.moe = dataclasses.replace(cfg.moe, kind="topk", num_experts=num_experts, expert_ffn_hidden_size=48,
                                  router_topk=topk, grouped_gemm=True)
    cfg.trainer = dataclasses.replace(cfg.trainer, precision="fp32")
    config = transformer_config(cfg)
    if capacity_factor is not None:
        config = dataclasses.replace(config, moe_expert_capacity_factor=capacity_factor)
    torch.manual_seed(0)  # the same weights on every rank's copy of the full layer
    return build_module(layer_specs(cfg, config)[0].submodules.mlp, config=config, layer_number=1)


def _forward_backward(layer, hidden_SBH, grad_SBH):
    for param in layer.parameters():
        param.grad = None
    x = hidden_SBH.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_SBH)
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


def _both_dispatchers(rank, world_size, capacity_factor):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from anyexperts.moe.topk_layer import SlotTokenDispatcher, TopKMoELayer

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    layer = _layer(num_experts=8, topk=2, capacity_factor=capacity_factor)
    assert type(layer) is TopKMoELayer and type(layer.token_dispatcher) is SlotTokenDispatcher
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    hidden_SBH, grad_SBH = torch.randn(48, 2, 32, generator=gen), torch.randn(48, 2, 32, generator=gen)
    ours = _forward_backward(layer, hidden_SBH, grad_SBH)
    sent = layer.token_dispatcher.slots.last_dispatch_bytes_sent
    layer.token_dispatcher = MoEAlltoAllTokenDispatcher(layer.num_local_experts, layer.local_expert_indices,
                                                        config=layer.config, pg_collection=get_default_pg_collection())
    return ours, _forward_backward(layer, hidden_SBH, grad_SBH), sent


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_equals_megatrons_dispatcher(world_size, capacity_factor):
    results = run_distributed(_both_dispatchers, world_size, args=(capacity_factor,), expert_parallel_size=world_size)
    for rank, (ours, megatron, sent) in enumerate(results):
        (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = ours, megatron
        assert ref_out.abs().max() > 0 and ref_grad_x.abs().max() > 0
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys() and len(grads) >= 3, grads.keys()  # router, fc1, fc2
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert (sent > 0) == (world_size > 1), (rank, sent)  # rows travel only between ranks
