"""Model wrapping and optimisation: megatron DDP, get_megatron_optimizer, warmup + decay.

megatron-core picks its optimizer implementation from what is installed: Transformer
Engine's or apex's FusedAdam on GPU containers, torch.optim.AdamW otherwise (this CPU
machine). The distributed (sharded) optimizer is used only with CUDA: on CPU it checks
for `torch.cuda.*` tensor types (megatron-core-on-cpu.md, item 9).
"""

from __future__ import annotations

import torch

from anyexperts.config import TrainConfig
from anyexperts.model import params_dtype


def wrap_ddp(cfg: TrainConfig, model: torch.nn.Module):
    """megatron DDP: grads land in fp32 main_grad buffers, reduced once per global batch."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=torch.cuda.is_available(),
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: TrainConfig, ddp_model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = cfg.optim
    dtype = params_dtype(cfg)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=torch.cuda.is_available(),
    )
    return get_megatron_optimizer(optimizer_config, [ddp_model])


def build_scheduler(cfg: TrainConfig, optimizer):
    """Linear warmup to optim.lr, then cosine/linear decay to optim.min_lr at trainer.max_steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optim
    max_steps = cfg.trainer.max_steps
    warmup = min(opt.warmup_steps, max_steps - 1) if max_steps > 1 else 0
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max_steps,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max_steps,
        wd_incr_style="constant",
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
