"""Expert parallelism with a modality per token: EP = 2 equals one process, statistics split
by modality and per-modality budget targets included.

    OMP_NUM_THREADS=1 python -m pytest tests/test_modality_distributed.py -q

Built like tests/test_anyexperts_distributed.py (its layer pair, batch and gradient
reduction): each rank has its chunk of the global batch and the TokenInfo of that chunk;
the one-process reference runs the chunks as micro-batches (the per-modality budget is a
micro-batch term), each with its own chunk's TokenInfo. Compared: outputs, every gradient,
and the per-modality statistics collected over the world against the reference's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_anyexperts_distributed import (
    HIDDEN,
    NUM_EXPERTS,
    TOKENS_PER_RANK,
    _ae_config,
    _singleton_pg_collection,
    build_layer_pair,
    global_batch,
    gradient_diffs,
)
from tests.test_anyexperts_layer import rel_diff

pytestmark = pytest.mark.slow

WORLD = 2
MODALITY_STATS = ("real_experts_per_token", "virtual_experts_per_token", "slots_per_token", "importance_mean",
                  "modality_tokens", "k_histogram")


def _rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.moe import losses, stats, token_info
    from anyexperts.moe.token_info import TokenInfo

    ae = dataclasses.replace(_ae_config("micro"), budget_bias_rate=0.0, budget_target=None,
                             budget_target_by_modality={"image": 2.2, "text": 3.6})
    reference, ep_layer = build_layer_pair(ae, rank, world_size, _singleton_pg_collection(rank, world_size),
                                           expert_module=SequentialMLP)
    hidden_all, weight_all, chunk = global_batch(rank, world_size, tokens_per_rank=TOKENS_PER_RANK, hidden=HIDDEN)
    # Hidden states [N, 1, H]: rows are tokens in order; image on about two thirds of them.
    modality_all = (torch.arange(len(hidden_all)) % 3 != 0).to(torch.int64)

    def info(part: slice) -> TokenInfo:
        return TokenInfo(modality_T=modality_all[part])

    stats.reset()
    losses.reset_global_batch_state(reference)
    reference.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / world_size))
    x_ref = hidden_all.clone().requires_grad_(True)
    outs = []
    for r in range(world_size):
        part = slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK)
        with token_info.use(info(part)):
            out_part, _ = reference(x_ref[part])
        ((out_part * weight_all[part]).sum() / TOKENS_PER_RANK / world_size).backward()
        outs.append(out_part)
    out_ref = torch.cat(outs)
    ref_stats = stats.collect()

    stats.reset()
    ep_layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x_ep = hidden_all[chunk].clone().requires_grad_(True)
    with token_info.use(info(chunk)):
        out_ep, _ = ep_layer(x_ep)
    ((out_ep * weight_all[chunk]).sum() / TOKENS_PER_RANK).backward()
    ep_stats = stats.collect(group=dist.group.WORLD)
    stats.reset()

    diffs = {"output": rel_diff(out_ep.detach(), out_ref.detach()[chunk]),
             "input_grad": rel_diff(x_ep.grad / world_size, x_ref.grad[chunk])}
    diffs.update(gradient_diffs(ep_layer, dict(reference.named_parameters()),
                                NUM_EXPERTS // world_size, rank, world_size))
    for modality in ("text", "image"):
        for name in MODALITY_STATS:
            key = f"{name}/{modality}"
            diffs[f"stat:{key}"] = rel_diff(ep_stats[key][1], ref_stats[key][1])
    diffs["stat:budget_loss"] = rel_diff(ep_stats["budget_loss"][1], ref_stats["budget_loss"][1])
    return dict(diffs=diffs, ep_stats={k: v[1].tolist() for k, v in ep_stats.items() if "/" in k})


@pytest.fixture(scope="module")
def results():
    return run_distributed(_rank, WORLD, expert_parallel_size=WORLD)


def test_expert_parallel_equals_one_process_with_modality_split_statistics(results):
    for rank, result in enumerate(results):
        worst = max(result["diffs"], key=result["diffs"].get)
        assert result["diffs"][worst] < 1e-9, f"rank {rank}: {worst} differs by {result['diffs'][worst]:.2e}"
    ep_stats = results[0]["ep_stats"]
    # Both modalities were routed and counted: 8 text and 16 image tokens of the global batch.
    assert ep_stats["modality_tokens/text"] == 8 and ep_stats["modality_tokens/image"] == 16
