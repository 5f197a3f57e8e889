"""Per-layer MoE statistics for logging, from both MoE kinds.

- megatron's MoELayer (moe.kind=topk): aux losses come from megatron's layer-wise tracker
  (moe_utils.save_to_aux_losses_tracker, filled by its router); tokens per expert from a
  forward hook on each router that records into anyexperts.moe.stats.
- AnyExperts layers record everything into anyexperts.moe.stats themselves.

`collect_moe_metrics` returns flat `moe/<name>/layer<i>` scalars and 1-D vectors, reduced
over the data-parallel group, and resets both sources for the next logging window.
"""

from __future__ import annotations

from typing import Optional

import torch

from anyexperts.moe import stats


def attach_topk_router_hooks(model: torch.nn.Module) -> int:
    """Records tokens per expert, load imbalance and experts per token from megatron routers,
    as AnyExperts layers do; returns the number of routers hooked."""
    from megatron.core.transformer.moe.router import TopKRouter

    num_hooked = 0
    for module in model.modules():
        if isinstance(module, TopKRouter):
            layer_number = module.layer_number

            def hook(mod, _inputs, outputs, layer_number=layer_number):
                # Validation batches are not part of the training statistics; unlogged steps record nothing.
                if not mod.training or not stats.should_record(True):
                    return
                _probs, routing_map = outputs
                routing_map = routing_map.detach()
                tokens_per_expert = routing_map.sum(dim=0).float()
                stats.record(layer_number, "tokens_per_expert", tokens_per_expert)
                stats.record(layer_number, "load_imbalance", tokens_per_expert.max() / tokens_per_expert.mean())
                stats.record(layer_number, "real_experts_per_token", routing_map.sum(dim=1).float().mean())

            module.register_forward_hook(hook)
            num_hooked += 1
    return num_hooked


def collect_moe_metrics(*, num_micro_batches: int, dp_group=None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from megatron.core.transformer.moe import moe_utils

    scalars: dict[str, float] = {}
    vectors: dict[str, torch.Tensor] = {}
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if tracker:
        moe_utils.reduce_aux_losses_tracker_across_ranks()
        for name, entry in tracker.items():
            values = entry["values"].detach().float().cpu() / num_micro_batches
            for index, value in enumerate(values.tolist()):
                if value != 0.0:
                    scalars[f"moe/{name}/layer{index + 1}"] = value
        moe_utils.clear_aux_losses_tracker()

    per_layer = stats.collect(group=dp_group)
    for name, layers in per_layer.items():
        for layer_number, value in sorted(layers.items()):
            value = value.detach().float().cpu()
            key = f"moe/{name}/layer{layer_number}"
            if value.numel() == 1:
                scalars[key] = value.item()
            else:
                vectors[key] = value
    stats.reset()
    return scalars, vectors


def summarize(scalars: dict[str, float], name: str) -> Optional[float]:
    """Mean over layers of `moe/<name>/layer*` (for the console line)."""
    values = [v for k, v in scalars.items() if k.startswith(f"moe/{name}/layer")]
    return sum(values) / len(values) if values else None


LAYER_MEAN_NAMES = ("real_experts_per_token", "real_experts_per_token_at_eval", "val_real_experts_per_token")


def layer_means(scalars: dict[str, float]) -> dict[str, float]:
    """Means over the MoE layers of the real-expert counts, under their plain names
    (`real_experts_per_token`, ...), for the console line and a quick look in metrics.jsonl."""
    means = {}
    for name in LAYER_MEAN_NAMES:
        value = summarize(scalars, name)
        if value is not None:
            means[name] = value
    return means
