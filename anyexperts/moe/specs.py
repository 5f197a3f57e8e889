"""megatron-core ModuleSpec of a GPT TransformerLayer whose MLP is the AnyExperts MoE layer.

Usage in your own megatron-core model (parallel_state initialised as usual):

    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from anyexperts import AnyExpertsConfig, get_anyexperts_layer_spec

    config = TransformerConfig(num_layers=4, hidden_size=256, num_attention_heads=4,
                               num_moe_experts=16, moe_ffn_hidden_size=512, moe_router_topk=4,
                               expert_model_parallel_size=2, add_bias_linear=False,
                               gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    anyexperts = AnyExpertsConfig(k_min=2, k_max=6, num_virtual_experts=2, rho_max=0.25,
                                  budget_target=3.6, gate_norm="real", alpha=0.1, learn_alpha=True)
    layer_spec = get_anyexperts_layer_spec(anyexperts, normalization="RMSNorm")
    # A rival routing method in the same layer: get_anyexperts_layer_spec(TopPConfig(...)) or
    # get_anyexperts_layer_spec(ReMoEConfig(...)) (anyexperts/moe/routers/).
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=32000,
                     max_sequence_length=1024)

Training loop duties (see losses.py and stats.py):
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_microbatches))  # megatron's moe_utils
    anyexperts.moe.losses.reset_global_batch_state(model)     # before each step's micro-batches
    anyexperts.moe.losses.update_selection_biases(model)      # after each optimizer step
    anyexperts.moe.stats.collect(group=dp_group)              # per-layer routing statistics

Expert modules (`expert_module`): None (default) is the project's GroupedExperts
(experts.py: stacked weights; its compute path, `expert_path`, in expert_paths.py);
megatron's SequentialMLP or TEGroupedMLP classes are accepted too (same forward contract),
as is any ModuleSpec. megatron-core's
TransformerConfig fields the layer reads: num_moe_experts, moe_ffn_hidden_size,
expert_model_parallel_size, moe_router_dtype, params_dtype, init_method,
calculate_per_token_loss; moe_router_topk is unused (K comes from AnyExpertsConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from anyexperts.moe.config import AnyExpertsConfig, ReMoEConfig, TopPConfig
from anyexperts.moe.rebalance import RebalanceConfig

RoutingConfig = Union[AnyExpertsConfig, TopPConfig, ReMoEConfig]

# The base specs only check num_experts against None (to pick the MoE layout: an unfused
# pre-MLP norm); the real count comes from TransformerConfig.num_moe_experts at build time.
_ANY_NUM_EXPERTS = 1


def _base_layer_spec(use_transformer_engine: bool, normalization: str, te_grouped_gemm: bool) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        # TE norms take LayerNorm vs RMSNorm from TransformerConfig.normalization.
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=_ANY_NUM_EXPERTS, moe_grouped_gemm=te_grouped_gemm)
    return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=_ANY_NUM_EXPERTS, normalization=normalization)


def _expert_spec(expert_module, use_transformer_engine: bool, normalization: str,
                 expert_path: str = "auto") -> ModuleSpec:
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

    from anyexperts.moe.experts import GroupedExperts

    if isinstance(expert_module, ModuleSpec):
        return expert_module
    if expert_module is None or expert_module is GroupedExperts:
        return grouped_experts_spec(expert_path)
    if expert_module in (SequentialMLP, TEGroupedMLP):
        wants_te_grouped = expert_module is TEGroupedMLP
        if wants_te_grouped and not use_transformer_engine:
            raise ValueError("expert_module=TEGroupedMLP needs use_transformer_engine=True")
        megatron_moe = _base_layer_spec(use_transformer_engine, normalization, wants_te_grouped).submodules.mlp
        experts = megatron_moe.submodules.experts
        if experts.module is not expert_module:
            raise ValueError(f"expert_module={expert_module.__name__} is not available in this installation "
                             f"(megatron chose {experts.module.__name__})")
        return experts
    if isinstance(expert_module, type):
        return ModuleSpec(module=expert_module)
    raise ValueError(f"expert_module={expert_module!r} must be None, a module class or a ModuleSpec")


def grouped_experts_spec(expert_path: str = "auto") -> ModuleSpec:
    """The project's GroupedExperts with its compute path (expert_paths.py); it also stands in
    megatron's own MoELayer (MoESubmodules.experts), as moe.kind=topk with grouped_gemm does."""
    from anyexperts.moe.experts import GroupedExperts

    return ModuleSpec(module=GroupedExperts, params={"expert_path": expert_path})


def _routing_method(routing_config: RoutingConfig) -> tuple[AnyExpertsConfig, Union[type, ModuleSpec]]:
    """(the layer's settings, the router class or spec) of one routing method's config."""
    from anyexperts.moe.router import AnyExpertsRouter
    from anyexperts.moe.routers import ReLURouter, TopPRouter

    if isinstance(routing_config, AnyExpertsConfig):
        return routing_config, AnyExpertsRouter
    for config_cls, router_cls in ((TopPConfig, TopPRouter), (ReMoEConfig, ReLURouter)):
        if isinstance(routing_config, config_cls):
            return routing_config.layer_settings(), ModuleSpec(module=router_cls,
                                                               params={"routing_config": routing_config})
    raise ValueError(f"routing config must be an AnyExpertsConfig, TopPConfig or ReMoEConfig, "
                     f"got {type(routing_config).__name__}")


def get_anyexperts_moe_spec(routing_config: RoutingConfig, *, use_transformer_engine: bool = False,
                            normalization: str = "RMSNorm",
                            expert_module: Union[None, type, ModuleSpec] = None,
                            rebalance: Optional[RebalanceConfig] = None, expert_path: str = "auto") -> ModuleSpec:
    """The MLP part alone: ModuleSpec(AnyExpertsMoELayer, MoESubmodules(experts, router)), the
    router given by the config's type (AnyExperts, top-p or ReMoE); `rebalance` switches on
    least-loaded expert parallelism (rebalance.py); `expert_path` is GroupedExperts' compute path
    (expert_paths.py) when expert_module is the default."""
    from anyexperts.moe.layer import AnyExpertsMoELayer

    layer_settings, router = _routing_method(routing_config)
    return ModuleSpec(
        module=AnyExpertsMoELayer,
        submodules=MoESubmodules(experts=_expert_spec(expert_module, use_transformer_engine, normalization,
                                                      expert_path),
                                 router=router),
        params={"anyexperts_config": layer_settings, "rebalance_config": rebalance},
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def get_anyexperts_layer_spec(routing_config: RoutingConfig, *, use_transformer_engine: bool = False,
                              normalization: str = "RMSNorm",
                              expert_module: Union[None, type, ModuleSpec] = None,
                              rebalance: Optional[RebalanceConfig] = None, expert_path: str = "auto") -> ModuleSpec:
    """A GPT TransformerLayer spec (megatron's local or TE layout) with the AnyExperts MLP."""
    if not isinstance(routing_config, (AnyExpertsConfig, TopPConfig, ReMoEConfig)):
        raise ValueError(f"routing_config must be an AnyExpertsConfig, TopPConfig or ReMoEConfig, "
                         f"got {type(routing_config).__name__}")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"normalization={normalization!r} must be 'RMSNorm' or 'LayerNorm'")
    base = _base_layer_spec(use_transformer_engine, normalization, te_grouped_gemm=False)
    mlp = get_anyexperts_moe_spec(routing_config, use_transformer_engine=use_transformer_engine,
                                  normalization=normalization, expert_module=expert_module,
                                  rebalance=rebalance, expert_path=expert_path)
    return dataclasses.replace(base, submodules=dataclasses.replace(base.submodules, mlp=mlp))


__all__ = ["get_anyexperts_layer_spec", "get_anyexperts_moe_spec", "grouped_experts_spec"]
