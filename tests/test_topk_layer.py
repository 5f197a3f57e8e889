"""The project's top-k path (moe/topk_layer.py): megatron's MoELayer whose alltoall dispatcher skips
the sort by local expert where it is the identity (one EP and one TP rank). Its outputs and
gradients must equal those of megatron's own dispatcher bit for bit, and the sort must not run.
At EP = 2 the sort is real and runs: tests/test_train_e2e.py compares the EP = 2 run of this
path with the EP = 1 one."""

from __future__ import annotations

import dataclasses

import torch

from tests.distributed import run_distributed


def _layer(num_experts: int, topk: int):
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts.config import TrainConfig
    from anyexperts.model import layer_specs, transformer_config

    cfg = TrainConfig()
    cfg.model = dataclasses.replace(cfg.model, num_layers=1, hidden_size=32, num_attention_heads=1)
    cfg.moe = dataclasses.replace(cfg.moe, kind="topk", num_experts=num_experts, expert_ffn_hidden_size=48,
                                  router_topk=topk, grouped_gemm=True)
    cfg.trainer = dataclasses.replace(cfg.trainer, precision="fp32")
    config = transformer_config(cfg)
    torch.manual_seed(0)
    return build_module(layer_specs(cfg, config)[0].submodules.mlp, config=config, layer_number=1)


def _forward_backward(layer, hidden_SBH, grad_SBH):
    for param in layer.parameters():
        param.grad = None
    x = hidden_SBH.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_SBH)
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


def _check_against_megatrons_dispatcher(rank, world_size):
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from anyexperts.moe.topk_layer import TopKMoELayer, _AlltoAllWithoutIdentitySort

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    layer = _layer(num_experts=4, topk=2)
    assert type(layer) is TopKMoELayer and type(layer.token_dispatcher) is _AlltoAllWithoutIdentitySort
    gen = torch.Generator().manual_seed(1)
    hidden_SBH, grad_SBH = torch.randn(64, 2, 32, generator=gen), torch.randn(64, 2, 32, generator=gen)

    sorts = []
    original = token_dispatcher.sort_chunks_by_idxs

    def counting_sort(*args, **kwargs):
        sorts.append(1)
        return original(*args, **kwargs)

    token_dispatcher.sort_chunks_by_idxs = counting_sort
    try:
        ours = _forward_backward(layer, hidden_SBH, grad_SBH)
        sorts_ours = len(sorts)
        layer.token_dispatcher.__class__ = MoEAlltoAllTokenDispatcher  # megatron's own, same state
        megatron = _forward_backward(layer, hidden_SBH, grad_SBH)
        sorts_megatron = len(sorts) - sorts_ours
    finally:
        token_dispatcher.sort_chunks_by_idxs = original
    return ours, megatron, sorts_ours, sorts_megatron


def test_identity_sort_skipped_with_equal_results():
    ours, megatron, sorts_ours, sorts_megatron = run_distributed(_check_against_megatrons_dispatcher, 1,
                                                                 expert_parallel_size=1)[0]
    assert sorts_ours == 0 and sorts_megatron == 2  # megatron sorts after dispatch and before combine
    out, grad_x, grads = ours
    ref_out, ref_grad_x, ref_grads = megatron
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad_x)
    assert grads.keys() == ref_grads.keys() and len(grads) >= 3  # router and both expert weights
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
