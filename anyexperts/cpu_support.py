"""Every runtime workaround megatron-core 0.16.1 needs on a machine without CUDA, in one place.

megatron-core assumes CUDA in a handful of spots (measured list with file and line:
../shared/docs/megatron-core-on-cpu.md). `apply()` patches each of them, only when
`torch.cuda.is_available()` is False, and is idempotent. Nothing here changes behaviour
on a GPU machine. Each patch names the megatron code it stands in for, and
tests/test_cpu_support.py checks per patch both that megatron still has the CUDA-only
code (so a megatron upgrade that fixes it is noticed and the patch can go) and that the
patched call works on CPU.

Usage: `from anyexperts import cpu_support; cpu_support.apply()` before building models.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Patch:
    name: str
    # The megatron code that needs CUDA (module path:line in megatron-core 0.16.1).
    where: str
    apply: Callable[[], None]


# --------------------------------------------------------------------------------------
# 1. RNG tracker: tensor_parallel/random.py:235 torch.cuda.get_rng_state() in
#    CudaRNGStatesTracker.add, and _get/_set_cuda_rng_state in fork(). On CPU the named
#    states are CPU generator states, swapped into torch's default generator on fork.
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = mrandom.CudaRNGStatesTracker

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    tracker_cls.add = add
    tracker_cls.fork = fork
    # Checkpointing reads/writes "cuda" rng states through these module functions.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------
# 2. Streams: transformer/moe/token_dispatcher.py:445 torch.cuda.Stream() and :871
#    torch.cuda.current_stream()/torch.cuda.stream() in the alltoall dispatcher.
class _NullStream:
    """Stands in for a CUDA stream on CPU, where all work is already synchronous."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def query(self) -> bool:
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _patch_streams() -> None:
    torch.cuda.Stream = lambda *args, **kwargs: _NULL_STREAM
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM
    torch.cuda.default_stream = lambda device=None: _NULL_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Event = _NullEvent


# --------------------------------------------------------------------------------------
# 3. utils.py:631, router.py:90, dot_product_attention.py:189, mappings.py:444 and others
#    pass torch.cuda.current_device() as a device argument.
def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: _CPU


# --------------------------------------------------------------------------------------
# 4. transformer/moe/moe_utils.py:1192 reads te_general_gemm, which is only defined when
#    Transformer Engine imports (a NameError otherwise).
def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------
# 5. transformer/moe/moe_utils.py:1093 maybe_move_tensor_to_cpu converts only CUDA tensors
#    to numpy, so the alltoall dispatcher hands CPU tensors as split sizes to
#    all_to_all_single, which wants lists of ints.
def _patch_split_sizes_to_host() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------------------
# 6. Literal device='cuda' in optimizer/optimizer.py:907 (FP32Optimizer._scale).
def _patch_fp32_optimizer_scale() -> None:
    from megatron.core.optimizer import optimizer

    fp32_init = optimizer.FP32Optimizer.__init__

    def fp32_optimizer_init(self, *args, **kwargs):
        real_tensor = torch.tensor

        def cpu_tensor(*targs, **tkwargs):
            if tkwargs.get("device") == "cuda":
                tkwargs["device"] = _CPU
            return real_tensor(*targs, **tkwargs)

        # The literal sits in the middle of __init__; swapping torch.tensor for the call
        # is the narrowest change that does not copy megatron's constructor.
        torch.tensor = cpu_tensor
        try:
            fp32_init(self, *args, **kwargs)
        finally:
            torch.tensor = real_tensor

    optimizer.FP32Optimizer.__init__ = fp32_optimizer_init


# --------------------------------------------------------------------------------------
# 7. Gradient norm and clipping: optimizer/clip_grads.py:89,103,113 allocate on
#    device='cuda' (and utils.py:1207 in the apex-less l2 norm), and :167 asserts
#    param.grad.type() == 'torch.cuda.FloatTensor'. Same maths, on the grads' device.
def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        grads = [g.detach().float() for g in grads_for_norm]
        norm_type = float(norm_type)
        if norm_type == float("inf"):
            total = torch.stack([g.abs().max() for g in grads]).max() if grads else torch.zeros(())
            total = total.reshape(1)
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=grad_stats_parallel_group)
            return total.item()
        total = torch.stack([torch.linalg.vector_norm(g, norm_type) ** norm_type for g in grads]).sum() \
            if grads else torch.zeros(())
        total = total.reshape(1)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
        return total.item() ** (1.0 / norm_type)

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    for module in (clip_grads, optimizer):
        module.get_grad_norm_fp32 = get_grad_norm_fp32
        module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


# --------------------------------------------------------------------------------------
# 8. dist_checkpointing/strategies/filesystem_async.py:230 torch.cuda.synchronize() after
#    non-blocking copies to CPU (which are already synchronous on CPU).
def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


# --------------------------------------------------------------------------------------
# 9. transformer/utils.py:35 get_default_causal_mask builds the causal mask on "cuda"
#    (used by the unfused softmax when no attention mask is passed).
def _patch_causal_mask() -> None:
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


PATCHES: tuple[Patch, ...] = (
    Patch("rng_tracker", "tensor_parallel/random.py:235", _patch_rng_tracker),
    Patch("streams", "transformer/moe/token_dispatcher.py:445,871", _patch_streams),
    Patch("current_device", "utils.py:631, tensor_parallel/mappings.py:444", _patch_current_device),
    Patch("te_general_gemm", "transformer/moe/moe_utils.py:1192", _patch_te_general_gemm),
    Patch("split_sizes_to_host", "transformer/moe/moe_utils.py:1093", _patch_split_sizes_to_host),
    Patch("fp32_optimizer_scale", "optimizer/optimizer.py:907", _patch_fp32_optimizer_scale),
    Patch("clip_grads", "optimizer/clip_grads.py:89,103,113,167", _patch_clip_grads),
    Patch("synchronize", "dist_checkpointing/strategies/filesystem_async.py:230", _patch_synchronize),
    Patch("causal_mask", "transformer/utils.py:35", _patch_causal_mask),
)

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Applies every patch once when CUDA is absent; returns whether patches are active."""
    global _applied
    if not needed():
        return False
    if not _applied:
        for patch in PATCHES:
            patch.apply()
        _applied = True
        log.debug("megatron-core CPU patches applied: %s", ", ".join(p.name for p in PATCHES))
    return True


def is_applied() -> bool:
    return _applied
