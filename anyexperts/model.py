"""Builds the megatron-core GPTModel of a run: dense, top-k MoE, or AnyExperts MoE layers.

The transformer config comes from `TrainConfig` (anyexperts.config). On a machine
without Transformer Engine the local spec (plain torch modules) is used; with TE the TE
spec. The MLP of each MoE layer is megatron-core's MoELayer (`moe.kind=topk`; with
`moe.grouped_gemm` and no TE its experts are the project's GroupedExperts) or the
AnyExperts layer (anyexperts/moe/specs.py) with its own router (`moe.kind=anyexperts`) or a
rival one (`moe.kind=topp` / `remoe`, anyexperts/moe/routers/).

Initialisation is layout-invariant (`reinit_layout_invariant`): every parameter is drawn
from a generator seeded by the run seed and the parameter's *global* name (expert
parameters by global expert index), so the same seed gives the same weights at any
expert-parallel size. That is what makes EP=1 and EP=2 runs comparable step for step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from anyexperts.config import TrainConfig


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def params_dtype(cfg: TrainConfig) -> torch.dtype:
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(cfg: TrainConfig):
    """megatron-core TransformerConfig from the run config."""
    from megatron.core.transformer import TransformerConfig

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        # megatron's mlp.py:247 fails with biases at EP=1 (measured); modern LMs drop them anyway.
        add_bias_linear=False,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        sequence_parallel=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA (and apex/TE); the unfused paths are exact.
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if moe.kind != "none":
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_router_topk=moe.router_topk,
            # At top-1 a renormalised gate is always 1 and the router learns nothing from the
            # output; megatron refuses that, so top-1 gates are the softmax over all experts.
            moe_router_pre_softmax=moe.router_topk == 1,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_token_dispatcher_type=moe.token_dispatcher,
            # Without TE, grouped_gemm means the project's GroupedExperts (layer_specs), which
            # megatron's config must not know of: its own grouped GEMM needs TE or a CUDA package.
            moe_grouped_gemm=moe.grouped_gemm and have_transformer_engine(),
            moe_layer_freq=moe.layer_freq,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kwargs)


def layer_specs(cfg: TrainConfig, config) -> list:
    """One ModuleSpec per transformer layer (dense or MoE per moe.layer_freq)."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = have_transformer_engine()

    def base_spec(num_experts: Optional[int]):
        if use_te:
            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
                num_experts=num_experts, moe_grouped_gemm=cfg.moe.grouped_gemm)
        return gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, normalization=cfg.model.normalization)

    dense = base_spec(None)
    if cfg.moe.kind == "none":
        return [dense] * cfg.model.num_layers
    if cfg.moe.kind == "topk" and cfg.moe.grouped_gemm and not use_te:
        # The project's top-k path: megatron's MoELayer (router, aux loss) with the project's
        # dispatcher and GroupedExperts instead of megatron's alltoall dispatcher and the
        # SequentialMLP of the local spec (moe/topk_layer.py).
        from anyexperts.moe.specs import grouped_experts_spec
        from anyexperts.moe.topk_layer import TopKMoELayer

        moe_spec = base_spec(cfg.moe.num_experts)
        mlp = dataclasses.replace(moe_spec.submodules.mlp, module=TopKMoELayer, submodules=dataclasses.replace(
            moe_spec.submodules.mlp.submodules, experts=grouped_experts_spec(cfg.moe.expert_path)))
        moe_spec = dataclasses.replace(moe_spec, submodules=dataclasses.replace(moe_spec.submodules, mlp=mlp))
    elif cfg.moe.kind == "topk":
        moe_spec = base_spec(cfg.moe.num_experts)
    else:
        from anyexperts.moe.specs import get_anyexperts_layer_spec

        moe_spec = get_anyexperts_layer_spec(
            cfg.moe.routing_config(), use_transformer_engine=use_te, normalization=cfg.model.normalization,
            rebalance=cfg.moe.rebalance, expert_path=cfg.moe.expert_path)
    return [moe_spec if i % cfg.moe.layer_freq == 0 else dense for i in range(cfg.model.num_layers)]


def build_model(cfg: TrainConfig, vocab_size: int):
    """The GPTModel for this rank (parallel_state must be initialised)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    config = transformer_config(cfg)
    if have_transformer_engine():
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = gpt_layer_specs.LNImpl
    block_spec = TransformerBlockSubmodules(layer_specs=layer_specs(cfg, config), layer_norm=final_norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                                     cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.model.seq_length,
        share_embeddings_and_output_weights=cfg.model.share_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    reinit_layout_invariant(model, seed=cfg.trainer.seed, init_method_std=cfg.model.init_method_std,
                            num_layers=cfg.model.num_layers)
    return model


# Parameter names of local experts: "...experts.local_experts.<i>.<rest>" (SequentialMLP) or
# "...experts.linear_fc1.weight<i>" (TEGroupedMLP): prefix, local index, suffix.
_LOCAL_EXPERT = re.compile(r"(.*\.experts\.local_experts\.)(\d+)(\..*)|(.*\.experts\.linear_fc[12]\.weight)(\d+)()$")
# Output projections get the scaled init std / sqrt(2 * num_layers), as megatron does.
_OUTPUT_PROJ = re.compile(r".*(linear_proj|linear_fc2)\.weight\d*$")


def global_param_name(name: str, num_local_experts: int, ep_rank: int) -> str:
    """The parameter's name as it would be at expert-parallel size 1."""
    parts = _expert_parts(name)
    if parts:
        prefix, index, suffix = parts
        return f"{prefix}{ep_rank * num_local_experts + index}{suffix}"
    return name


def _expert_parts(name: str):
    match = _LOCAL_EXPERT.match(name)
    if not match:
        return None
    if match.group(1) is not None:
        return match.group(1), int(match.group(2)), match.group(3)
    return match.group(4), int(match.group(5)), ""


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# AnyExperts' GroupedExperts stack local experts on dim 0: "...experts.fc1_weight" [E_local, ...].
_STACKED_EXPERTS = re.compile(r"(.*\.experts\.)(fc[12]_weight)$")


def _init_targets(model: torch.nn.Module, ep_rank: int):
    """(tensor to fill, global name, is output projection) for every matrix of the model."""
    counts: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = _expert_parts(name)
        if parts:
            counts[parts[0]] = max(counts.get(parts[0], 0), parts[1] + 1)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        stacked = _STACKED_EXPERTS.match(name)
        if stacked and param.dim() == 3:
            num_local = param.shape[0]
            for index in range(num_local):
                global_index = ep_rank * num_local + index
                yield param[index], f"{stacked.group(1)}{global_index}.{stacked.group(2)}", stacked.group(2) == "fc2_weight"
            continue
        parts = _expert_parts(name)
        yield param, global_param_name(name, counts[parts[0]] if parts else 0, ep_rank), bool(_OUTPUT_PROJ.match(name))


@torch.no_grad()
def reinit_layout_invariant(model: torch.nn.Module, *, seed: int, init_method_std: float, num_layers: int) -> None:
    """Redraws every matrix from a generator keyed by (seed, global parameter name).

    Vectors (norm weights, biases) keep megatron's deterministic constants; matrices get
    N(0, std) with megatron's scaled std for output projections. Expert weights are named
    by their global expert index: SequentialMLP's local_experts.<i>, TEGroupedMLP's
    weight<i>, and each slice of GroupedExperts' stacked fc1/fc2 weights (legacy
    GroupedMLP is not supported). Needs tensor-parallel size 1 (a TP shard would need slicing).
    """
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    output_std = init_method_std / math.sqrt(2.0 * num_layers)
    for tensor, global_name, is_output in _init_targets(model, ep_rank):
        generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, global_name))
        values = torch.empty(tensor.shape, dtype=torch.float32).normal_(
            0.0, output_std if is_output else init_method_std, generator=generator)
        tensor.copy_(values.to(device=tensor.device, dtype=tensor.dtype))


def count_parameters(model: torch.nn.Module) -> dict:
    """Local parameter counts: total, expert (held by this rank), and non-expert."""
    expert = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "expert_local": expert, "non_expert": total - expert}


def estimate_num_parameters(cfg: TrainConfig, vocab_size: int) -> tuple[int, int]:
    """(total, active per token) parameter counts of the whole model, without building it."""
    m, moe = cfg.model, cfg.moe
    hidden = m.hidden_size
    gate_factor = 3 if m.activation == "swiglu" else 2
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by)
    embeddings = vocab * hidden * (1 if m.share_embeddings_and_output_weights else 2)
    attention = 4 * hidden * hidden + 2 * hidden  # qkv + proj, two norms
    dense_mlp = gate_factor * hidden * m.ffn_hidden_size
    total = active = embeddings
    for layer in range(m.num_layers):
        total += attention
        active += attention
        if moe.kind != "none" and layer % moe.layer_freq == 0:
            expert = gate_factor * hidden * moe.expert_ffn_hidden_size
            router = hidden * (moe.num_experts + (moe.anyexperts.num_virtual_experts if moe.kind == "anyexperts" else 0))
            total += moe.num_experts * expert + router
            slots = {"topk": moe.router_topk, "anyexperts": moe.anyexperts.k_max,
                     # The rivals' widest token: max_experts (all E when unset).
                     "topp": moe.topp.max_experts or moe.num_experts,
                     "remoe": moe.remoe.max_experts or moe.num_experts}[moe.kind]
            active += slots * expert + router
        else:
            total += dense_mlp
            active += dense_mlp
    return total, active
