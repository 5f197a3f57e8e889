"""The pretraining loop: data -> megatron GPTModel (MoE) -> DDP -> optimizer, with logging.

Called by `python -m launcher.train` once torch.distributed is up on every rank
(see launcher/bootstrap.py). One global batch per step: gradient accumulation over
micro-batches, one gradient all-reduce (megatron DDP), clipping, an optimizer step and a
scheduler step; validation loss every `trainer.eval_interval` steps, and with
`data.extra_validation` the loss on each of those corpora too (`val_loss/<name>`); on
data=digits also caption_accuracy and caption_loss (training/captions.py), and the MoE
layers get each token's modality (moe/token_info.py) for statistics split by modality.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from anyexperts import cpu_support
from anyexperts.config import MODALITY_SOURCES, TrainConfig
from anyexperts.training.batches import BatchLayout, micro_batches
from anyexperts.training.metrics import MetricsLogger
from anyexperts.moe import allocation, stats, token_info
from anyexperts.moe.losses import reset_global_batch_state, update_selection_biases
from anyexperts.moe.trace import routing_trace, save_trace
from anyexperts.training import allocation_eval, host_memory, moe_metrics
from anyexperts.training.captions import CaptionMetrics, logits_and_per_token_loss
from anyexperts.training.optim import build_optimizer, build_scheduler, current_lr, wrap_ddp
from anyexperts.training.checkpoint import Checkpointer  # issue 5
from anyexperts.training.signals import StopSignal, debug_hooks, signal_name  # issue 5


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    steps_done: int = 0
    wall_time_s: float = 0.0
    # --- checkpoint / preemption (issue 5) ---
    # The signal number that stopped the run after a checkpoint (0: it ran to max_steps);
    # the launcher turns it into the exit code and the Slurm requeue.
    stop_signal: int = 0
    resumed_from: Optional[str] = None
    last_checkpoint: Optional[str] = None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def setup_parallel(cfg: TrainConfig) -> None:
    """megatron's process groups and seeds (torch.distributed must already be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_support.apply()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
    )
    torch.manual_seed(cfg.trainer.seed)
    model_parallel_cuda_manual_seed(cfg.trainer.seed)
    if cfg.trainer.deterministic and torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True


def prepare_data(cfg: TrainConfig, logger: MetricsLogger):
    """Rank 0 prepares (or finds) the tokenized corpus first; the others then read it."""
    from anyexperts.data.prepare import ensure_prepared

    prefix, tokenizer = None, None
    if dist.get_rank() == 0:
        logger.info(f"data: {cfg.data.source} (tokenizer {cfg.data.tokenizer})")
        prefix, tokenizer = ensure_prepared(cfg.data, show_progress=True)
    dist.barrier()
    if dist.get_rank() != 0:
        prefix, tokenizer = ensure_prepared(cfg.data, show_progress=False)
    return prefix, tokenizer


def build_datasets(cfg: TrainConfig, prefix: str, tokenizer):
    from anyexperts.data.datasets import build_gpt_datasets

    tr = cfg.trainer
    num_evals = tr.max_steps // tr.eval_interval + 1
    num_samples = (tr.max_steps * tr.global_batch_size, num_evals * tr.eval_iters * tr.global_batch_size, 0)
    train_ds, valid_ds, _ = build_gpt_datasets(
        prefix, tokenizer, seq_length=cfg.model.seq_length, split=cfg.data.split, seed=tr.seed,
        num_samples=num_samples)
    return train_ds, valid_ds


# Shuffles the samples of every extra validation corpus the same way in every run, whatever
# trainer.seed, so that runs of a grid are compared on the same tokens.
EXTRA_VALIDATION_SEED = 0


def build_extra_validation(cfg: TrainConfig, tokenizer) -> dict[str, object]:
    """{name: dataset} for data.extra_validation: every document of each corpus (none is
    trained on), tokenized with the run's tokenizer; rank 0 prepares first."""
    from anyexperts.data.datasets import build_gpt_datasets
    from anyexperts.data.prepare import ensure_bundled_prepared

    datasets = {}
    for name in cfg.data.extra_validation:
        prefix = None
        if dist.get_rank() == 0:
            prefix = ensure_bundled_prepared(name, tokenizer, cfg.data.cache_dir, show_progress=True)
        dist.barrier()
        if dist.get_rank() != 0:
            prefix = ensure_bundled_prepared(name, tokenizer, cfg.data.cache_dir, show_progress=False)
        num_samples = cfg.data.extra_validation_batches * cfg.trainer.global_batch_size
        datasets[name], _, _ = build_gpt_datasets(
            prefix, tokenizer, seq_length=cfg.model.seq_length, split="1,0,0", seed=EXTRA_VALIDATION_SEED,
            num_samples=(num_samples, 0, 0))
    return datasets


def _per_token_loss(model, batch: dict) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])


def _forward_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token loss over unmasked tokens, number of those tokens) for one micro-batch."""
    per_token_loss = _per_token_loss(model, batch)
    mask = batch["loss_mask"].to(per_token_loss.dtype)
    return (per_token_loss.float() * mask).sum(), mask.sum()


def _global_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor, group) -> float:
    packed = torch.stack([loss_sum.detach().float(), num_tokens.detach().float()])
    dist.all_reduce(packed, group=group)
    return (packed[0] / packed[1].clamp(min=1)).item()


@dataclass
class EvalResult:
    val_loss: float
    # Logged beside val_loss: validation routing statistics (moe/val_<name>/layer<i>),
    # moe/importance_loss_spearman/layer<i> and val_loss_shuffled_allocation.
    scalars: dict[str, float] = field(default_factory=dict)


def _logs_step(step: int, cfg: TrainConfig) -> bool:
    """Whether step `step` (1-based) writes a metrics record: every log_interval, the first, and
    every validation step."""
    tr = cfg.trainer
    return (step % cfg.logging.log_interval == 0 or step == 1 or step % tr.eval_interval == 0
            or step == tr.max_steps)


def _real_experts_budget(cfg: TrainConfig) -> Optional[float]:
    if cfg.moe.kind == "topk":
        return float(cfg.moe.router_topk)
    if cfg.moe.kind == "anyexperts":
        return cfg.moe.anyexperts.budget_target
    if cfg.moe.kind in ("topp", "remoe"):
        return cfg.moe.routing_config().target_real_experts
    return None


def _allocates_variable_k(cfg: TrainConfig) -> bool:
    ae = cfg.moe.anyexperts
    return cfg.moe.kind == "anyexperts" and ae.k_max > ae.k_min


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainConfig, layout: BatchLayout, dp_group, eval_index: int,
             trace_path: Optional[Path] = None) -> EvalResult:
    """Mean validation loss over trainer.eval_iters global batches; with trace_path, the
    routing of this rank's first micro-batch is saved there (anyexperts.moe.trace).

    With AnyExperts layers of variable K, also the routing statistics of these batches,
    the importance-loss correlation and the loss with the allocation shuffled (a second
    pass over the same batches: evaluation costs twice as much).
    """
    model.eval()
    diagnose = _allocates_variable_k(cfg)
    correlation = allocation_eval.ImportanceLossCorrelation()
    captions = CaptionMetrics(_device()) if cfg.data.source == "digits" else None

    def forward(batch: dict, *, record: bool) -> torch.Tensor:
        if captions is None:
            return _per_token_loss(model, batch)
        logits_BSV, per_token_loss = logits_and_per_token_loss(model, batch)
        if record:
            captions.add(batch, logits_BSV, per_token_loss)
        return per_token_loss

    def run_pass(*, record: bool) -> float:
        loss_sum = torch.zeros((), device=_device())
        num_tokens = torch.zeros((), device=_device())
        samples_per_eval = cfg.trainer.eval_iters * cfg.trainer.global_batch_size
        for it in range(cfg.trainer.eval_iters):
            consumed = eval_index * samples_per_eval + it * cfg.trainer.global_batch_size
            for micro, batch in enumerate(micro_batches(dataset, layout, consumed, device=_device())):
                save_here = record and trace_path is not None and it == 0 and micro == 0
                if (record and diagnose) or save_here:
                    with routing_trace() as trace:
                        per_token_loss = forward(batch, record=record)
                    if record and diagnose:
                        correlation.add(trace, per_token_loss, batch["loss_mask"])
                    if save_here:
                        # The layers see tokens in [sequence, batch] order.
                        tokens_T = batch["tokens"].t().reshape(-1).cpu()
                        for entry in trace:
                            entry["tokens"] = tokens_T
                            entry["seq_length"] = batch["tokens"].shape[1]
                        save_trace(trace, trace_path)
                else:
                    per_token_loss = forward(batch, record=record)
                mask = batch["loss_mask"].to(per_token_loss.dtype)
                loss_sum += (per_token_loss.float() * mask).sum()
                num_tokens += mask.sum()
        return _global_mean(loss_sum, num_tokens, dp_group)

    try:
        with stats.separate_sink(enabled=diagnose) as sink:
            val_loss = run_pass(record=True)
        result = EvalResult(val_loss=val_loss)
        if captions is not None:
            result.scalars.update(captions.collect(group=dp_group))
        if diagnose:
            result.scalars.update(allocation_eval.validation_stat_scalars(sink.collect(group=dp_group)))
            result.scalars.update(correlation.collect(group=dp_group))
            with stats.separate_sink(enabled=False), allocation.shuffled_allocation(seed=eval_index):
                result.scalars["val_loss_shuffled_allocation"] = run_pass(record=False)
    finally:
        model.train()
    return result


@torch.no_grad()
def evaluate_extra(model, datasets: dict, cfg: TrainConfig, layout: BatchLayout, dp_group) -> dict[str, float]:
    """{'val_loss/<name>': mean loss} over the same data.extra_validation_batches global
    batches of each extra corpus at every call."""
    model.eval()
    scalars = {}
    try:
        # A separate, disabled sink: these forwards stay out of the training and validation statistics.
        with stats.separate_sink(enabled=False):
            for name, dataset in datasets.items():
                loss_sum = torch.zeros((), device=_device())
                num_tokens = torch.zeros((), device=_device())
                for it in range(cfg.data.extra_validation_batches):
                    for batch in micro_batches(dataset, layout, it * cfg.trainer.global_batch_size, device=_device()):
                        s, n = _forward_loss(model, batch)
                        loss_sum += s
                        num_tokens += n
                scalars[f"val_loss/{name}"] = _global_mean(loss_sum, num_tokens, dp_group)
    finally:
        model.train()
    return scalars


def train(cfg: TrainConfig, run_dir: Path) -> TrainResult:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from anyexperts.model import build_model, count_parameters

    wall_start = time.monotonic()
    if cfg.trainer.keep_freed_memory:
        host_memory.keep_freed_memory()
    setup_parallel(cfg)
    is_logging_rank = dist.get_rank() == 0
    logger = MetricsLogger(run_dir, enabled=is_logging_rank, tensorboard=cfg.logging.tensorboard,
                           console=cfg.logging.console, max_steps=cfg.trainer.max_steps,
                           real_experts_budget=_real_experts_budget(cfg))
    dp_group = parallel_state.get_data_parallel_group()
    layout = BatchLayout(
        micro_batch_size=cfg.trainer.micro_batch_size,
        global_batch_size=cfg.trainer.global_batch_size,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
    )

    prefix, tokenizer = prepare_data(cfg, logger)
    train_ds, valid_ds = build_datasets(cfg, prefix, tokenizer)
    extra_validation = build_extra_validation(cfg, tokenizer)

    model = build_model(cfg, tokenizer.vocab_size)
    if cfg.data.source in MODALITY_SOURCES:
        from anyexperts.data.digits import modality_of_tokens

        # Every forward (training, validation, extra validation) tells the MoE layers its tokens' modalities.
        token_info.attach(model, modality_of_tokens)
    if cfg.moe.kind == "topk":
        moe_metrics.attach_topk_router_hooks(model)
    counts = count_parameters(model)
    logger.info(f"model: {counts['total']:,} parameters on rank 0 ({counts['expert_local']:,} in local experts); "
                f"world {dist.get_world_size()}, data-parallel {layout.data_parallel_size}, "
                f"expert-parallel {cfg.parallel.expert_model_parallel_size}, "
                f"{layout.num_micro_batches} micro-batches of {layout.micro_batch_size} per step")
    ddp_model = wrap_ddp(cfg, model)
    optimizer = build_optimizer(cfg, ddp_model)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState()
    result = TrainResult()
    device = _device()
    tokens_per_step = cfg.trainer.global_batch_size * cfg.model.seq_length
    # megatron scales the aux-loss gradient by this: each micro-batch is 1/num of the step.
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / layout.num_micro_batches, device=device))

    # --- checkpoint / preemption (issue 5): resume after the optimizer and scheduler exist ---
    checkpointer = Checkpointer(cfg, run_dir, log_fn=logger.info, event_fn=logger.event)
    resumed_from = checkpointer.resume(model, optimizer, scheduler, state)
    result.resumed_from = str(resumed_from) if resumed_from else None
    if cfg.trainer.eval_only:
        try:
            if resumed_from is None:
                raise RuntimeError(f"trainer.eval_only=true found no checkpoint (checkpoint.resume="
                                   f"{cfg.checkpoint.resume}); set checkpoint.resume=<path of a checkpoint>")
            # The same validation samples the training run used at this step.
            evaluation = evaluate(ddp_model, valid_ds, cfg, layout, dp_group,
                                  eval_index=state.step // cfg.trainer.eval_interval)
            val_loss = evaluation.val_loss
            result.val_losses[state.step] = val_loss
            extra_scalars = evaluate_extra(ddp_model, extra_validation, cfg, layout, dp_group)
            logger.log(state.step, {"val_loss": val_loss, "eval_only": True, **extra_scalars, **evaluation.scalars})
            logger.info(f"eval_only: step {state.step} val_loss {val_loss:.6f}")
        finally:
            logger.close()
        result.steps_done = state.step
        result.wall_time_s = time.monotonic() - wall_start
        return result
    stop = StopSignal.install()
    # --- end checkpoint / preemption ---

    window_start = time.monotonic()
    window_steps = 0
    try:
        while state.step < cfg.trainer.max_steps:
            # Statistics are recorded only in the steps that are logged: they cost nothing in the others.
            stats.record_training(_logs_step(state.step + 1, cfg))
            ddp_model.zero_grad_buffer()
            # AnyExperts global-batch load-balance/budget sums restart with each global batch.
            reset_global_batch_state(model)
            optimizer.zero_grad()
            loss_sum = torch.zeros((), device=device)
            num_tokens = torch.zeros((), device=device)
            for batch in micro_batches(train_ds, layout, state.consumed_samples, device=device):
                s, n = _forward_loss(ddp_model, batch)
                # Each micro-batch's mean loss, averaged over micro-batches; DDP averages over ranks.
                (s / n.clamp(min=1) / layout.num_micro_batches).backward()
                loss_sum += s.detach()
                num_tokens += n
            ddp_model.finish_grad_sync()
            update_ok, grad_norm, _ = optimizer.step()
            # Aux-loss-free balancing (DeepSeek-V3): per-expert selection biases follow the loads.
            update_selection_biases(model)
            scheduler.step(increment=1)
            state.step += 1
            state.consumed_samples += cfg.trainer.global_batch_size
            window_steps += 1

            loss = _global_mean(loss_sum, num_tokens, dp_group)
            result.losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {state.step}; lower optim.lr or check the data")

            val_loss, val_scalars = None, {}
            if state.step % cfg.trainer.eval_interval == 0 or state.step == cfg.trainer.max_steps:
                trace_path = None
                tr = cfg.trainer
                if ((tr.routing_trace_interval and state.step % tr.routing_trace_interval == 0)
                        or (tr.routing_trace_at_end and state.step == tr.max_steps)):
                    trace_path = run_dir / "routing_traces" / f"step_{state.step:07d}_rank{dist.get_rank()}.npz"
                evaluation = evaluate(ddp_model, valid_ds, cfg, layout, dp_group,
                                      eval_index=state.step // cfg.trainer.eval_interval, trace_path=trace_path)
                val_loss = evaluation.val_loss
                val_scalars = {**evaluate_extra(ddp_model, extra_validation, cfg, layout, dp_group),
                               **evaluation.scalars}
                result.val_losses[state.step] = val_loss
                host_memory.trim()

            if _logs_step(state.step, cfg):
                elapsed = time.monotonic() - window_start
                scalars = {
                    "loss": loss,
                    "lr": current_lr(optimizer),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                    "consumed_samples": state.consumed_samples,
                    "update_ok": bool(update_ok),
                }
                if val_loss is not None:
                    scalars["val_loss"] = val_loss
                moe_scalars, moe_vectors = moe_metrics.collect_moe_metrics(
                    num_micro_batches=layout.num_micro_batches * window_steps, dp_group=dp_group)
                scalars.update(moe_scalars)
                scalars.update(val_scalars)
                scalars.update(moe_metrics.layer_means(scalars))
                logger.log(state.step, scalars, moe_vectors)
                logger.progress(state.step, scalars)
                window_start, window_steps = time.monotonic(), 0

            # --- checkpoint / preemption (issue 5): every rank, at the same point of every step ---
            debug_hooks(state.step, signal_at_step=cfg.trainer.debug_signal_at_step,
                        fail_at_step=cfg.trainer.debug_fail_at_step)
            stop_signal = stop.agreed(device=device)
            if stop_signal or (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0):
                saved = checkpointer.save(model, optimizer, scheduler, state)
                host_memory.trim()
                if saved is not None:  # keep the save out of the next tokens_per_s window
                    window_start += saved.seconds
            if stop_signal:
                logger.info(f"stopping after step {state.step}: {signal_name(stop_signal)} received; "
                            f"checkpoint {checkpointer.last_saved_path} saved")
                result.stop_signal = stop_signal
                break
        if (cfg.checkpoint.save_at_end and not result.stop_signal
                and checkpointer.last_saved_step != state.step):
            checkpointer.save(model, optimizer, scheduler, state)
        result.last_checkpoint = str(checkpointer.last_saved_path) if checkpointer.last_saved_path else None
        # --- end checkpoint / preemption ---
        if cfg.trainer.pictures_at_end and is_logging_rank and not result.stop_signal:
            from anyexperts.training.pictures import draw_pictures_at_end

            draw_pictures_at_end(run_dir)
    finally:
        stats.record_training(True)
        stop.restore()
        logger.close()
    result.steps_done = state.step
    result.wall_time_s = time.monotonic() - wall_start
    return result
