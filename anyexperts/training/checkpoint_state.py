"""What a checkpoint holds and how it maps onto this run's model, optimizer and scheduler.

The sharded state dict (model and Adam moments as megatron ShardedTensors, the rest in
common state, one RNG object per rank), the shape checks that refuse a checkpoint of
another model or tokenizer, and the helpers that load Adam moments across a change of
megatron's sub-optimizer structure. The save/load protocol is in checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from anyexperts.config import TrainConfig

FORMAT_VERSION = 1

# Model/MoE settings that change a tensor's shape or the set of tensors: a checkpoint written
# with other values cannot be loaded into this model.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "activation",
              "normalization", "position_embedding_type", "share_embeddings_and_output_weights",
              "make_vocab_size_divisible_by"),
    "moe": ("kind", "num_experts", "expert_ffn_hidden_size", "layer_freq", "grouped_gemm"),
}


def parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "megatron_tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


def optimizer_structure(optimizer) -> list[str]:
    """The class of each sub-optimizer of megatron's ChainedOptimizer. megatron makes a
    separate expert optimizer only at expert-parallel size > 1 (at EP=1 experts are plain
    data-parallel parameters), so this changes between EP=1 and EP>1."""
    return [type(opt).__name__ for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _sharded_state_dict_metadata(cfg: TrainConfig, optimizer) -> dict:
    # chained_optim_avoid_prefix: the expert and the dense optimizers of megatron's
    # ChainedOptimizer store their state under the parameters' own keys, so the keys do not
    # depend on how many sub-optimizers there are. singleton_local_shards=False: one
    # ShardedTensor per expert-stacked weight, as Megatron-LM saves.
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if uses_distributed_optimizer(optimizer):
        metadata["distrib_optim_sharding_type"] = cfg.checkpoint.distributed_optimizer_format
        from megatron.core import parallel_state as ps

        metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _train_state_fields(state) -> dict:
    return {"step": int(state.step), "consumed_samples": int(state.consumed_samples)}


def build_state_dict(cfg: TrainConfig, model, optimizer, scheduler, state, *, with_optimizer: bool,
                     with_rng: bool, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject

    metadata = _sharded_state_dict_metadata(cfg, optimizer)
    sharded = {"model": model.sharded_state_dict(metadata=metadata)}
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=is_loading,
                                                            metadata=metadata)
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = _train_state_fields(state)
    sharded["layout"] = parallel_layout()
    sharded["optimizer_structure"] = optimizer_structure(optimizer)
    sharded["model_config"] = {group: {k: dataclasses.asdict(getattr(cfg, group))[k] for k in keys}
                               for group, keys in SHAPE_FIELDS.items()}
    sharded["format_version"] = FORMAT_VERSION
    if with_rng:
        # One object per global rank; replica_id 0 everywhere because no two ranks hold the
        # same one. The global shape is the world size, so a different world cannot ask for it.
        sharded["rng_state"] = ShardedObject("rng_state", rng_state() if not is_loading else None,
                                             (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)
    return sharded



def _sharded_tensors(node):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(node):
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors(value.build())


def shape_problems(ckpt: Path, sharded: dict, limit: int = 5) -> list[str]:
    """Requested tensors that the checkpoint lacks or holds with another global shape.

    megatron checks global shapes itself, except for tensors marked allow_shape_mismatch: the
    word embeddings and the output layer, which it zero-pads or cuts to fit (meant for a
    change of vocabulary padding). A checkpoint from another tokenizer would then load
    silently wrong, so every shape is compared here; a changed padded vocabulary size is
    refused too."""
    from megatron.core import dist_checkpointing

    in_checkpoint = dist_checkpointing.load_tensors_metadata(str(ckpt))
    problems = []
    for tensor in _sharded_tensors(sharded):
        saved = in_checkpoint.get(tensor.key)
        if saved is None:
            problems.append(f"{tensor.key} is not in the checkpoint")
        elif tuple(saved.global_shape) != tuple(tensor.global_shape):
            problems.append(f"{tensor.key} is {tuple(saved.global_shape)} in the checkpoint but "
                            f"{tuple(tensor.global_shape)} in this model")
    if len(problems) > limit:
        problems = problems[:limit] + [f"and {len(problems) - limit} more"]
    return problems


def read_common(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    small = {k: common.get(k) for k in ("layout", "model_config", "format_version", "train_state",
                                        "optimizer_structure")}
    # The Adam step count (megatron keeps it out of the sharded tensors, as `common_step`).
    small["adam_steps"] = _find_common_steps(common.get("optimizer"))
    return small


def _find_common_steps(node) -> list:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "common_step":
                found.append(value)
            else:
                found.extend(_find_common_steps(value))
    elif isinstance(node, (list, tuple)):
        for value in node:
            found.extend(_find_common_steps(value))
    return found


def optimizer_tensors_request(cfg: TrainConfig, model_sharded: dict, optimizer) -> tuple[dict, dict]:
    """(the optimizer's sharded tensors, everything else of its state dict), both in this run's
    structure. Used when the checkpoint's sub-optimizer structure differs (EP=1 <-> EP>1):
    the tensors are keyed by parameter, so they load at any layout; the rest (param groups)
    is this run's own."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    current = optimizer.sharded_state_dict(model_sharded, is_loading=True,
                                           metadata=_sharded_state_dict_metadata(cfg, optimizer))
    tensors, rest = extract_sharded_base(current)
    rest = dict_list_map_inplace(lambda v: v.unwrap() if isinstance(v, LocalNonpersistentObject) else v, rest)
    return tensors, rest


def assemble_optimizer_state(rest: dict, loaded_tensors: dict, adam_steps: list) -> dict:
    """This run's optimizer state dict with the loaded moments and the checkpoint's Adam step."""
    from megatron.core.dist_checkpointing.dict_utils import merge

    state_dict = merge(rest, loaded_tensors)
    steps = {float(s) for s in adam_steps}
    if len(steps) > 1:
        raise ValueError(f"the sub-optimizers in the checkpoint are at different Adam steps {sorted(steps)}")
    if adam_steps:
        _put_common_step(state_dict, adam_steps[0])
    return state_dict


def _put_common_step(node, step) -> None:
    import copy

    if isinstance(node, dict):
        # A torch optimizer state dict: megatron's load_state_dict spreads common_step to every param.
        if isinstance(node.get("state"), dict) and "param_groups" in node:
            node["state"]["common_step"] = copy.deepcopy(step)
            return
        for value in node.values():
            _put_common_step(value, step)
    elif isinstance(node, list):
        for value in node:
            _put_common_step(value, step)


def load_scheduler(scheduler, saved: dict, ckpt: Path) -> None:
    # megatron's load_state_dict *adds* the saved step count (self.step(increment=num_steps)).
    scheduler.num_steps = 0
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as err:
        # megatron asserts that the schedule (max/min lr, warmup, decay steps, style) is unchanged.
        raise ValueError(f"the learning-rate schedule differs from the one in {ckpt} ({err}); resume with "
                         "the same optim.* and trainer.max_steps, or checkpoint.resume=none") from None
