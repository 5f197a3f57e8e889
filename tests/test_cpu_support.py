"""Each megatron-core CPU patch: megatron still has the CUDA-only code, and the patched call works.

The first half reads megatron's source files, so it fails when a megatron-core upgrade
removes the CUDA-only code: then the patch is unneeded (or wrong) and should go.
"""

from __future__ import annotations

import importlib
import inspect
import re
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from anyexperts import cpu_support
from tests.distributed import free_port

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")

# patch name -> (megatron module, a regex of the CUDA-only code it works around)
CUDA_ONLY_CODE = {
    "rng_tracker": ("megatron.core.tensor_parallel.random", r"torch\.cuda\.get_rng_state\(\)"),
    "streams": ("megatron.core.transformer.moe.token_dispatcher", r"torch\.cuda\.Stream\(\)"),
    "current_device": ("megatron.core.tensor_parallel.mappings", r"device=torch\.cuda\.current_device\(\)"),
    "te_general_gemm": ("megatron.core.transformer.moe.moe_utils", r"if te_general_gemm is not None"),
    "split_sizes_to_host": ("megatron.core.transformer.moe.moe_utils", r"if torch\.is_tensor\(tensor\) and tensor\.is_cuda:"),
    "fp32_optimizer_scale": ("megatron.core.optimizer.optimizer", r"self\._scale = torch\.tensor\(\[1\.0\], dtype=torch\.float, device='cuda'\)"),
    "clip_grads": ("megatron.core.optimizer.clip_grads", r"assert param\.grad\.type\(\) == 'torch\.cuda\.FloatTensor'"),
    "synchronize": ("megatron.core.dist_checkpointing.strategies.filesystem_async", r"torch\.cuda\.synchronize\(\)"),
    "causal_mask": ("megatron.core.transformer.utils", r'torch\.ones\(sq, sq, device="cuda"\)'),
}


def test_every_patch_has_a_source_check():
    assert {p.name for p in cpu_support.PATCHES} == set(CUDA_ONLY_CODE)


@pytest.mark.parametrize("patch_name", sorted(CUDA_ONLY_CODE))
def test_megatron_still_has_the_cuda_only_code(patch_name):
    module_name, pattern = CUDA_ONLY_CODE[patch_name]
    source_file = inspect.getsourcefile(importlib.import_module(module_name))
    with open(source_file) as handle:
        source = handle.read()
    assert re.search(pattern, source), (
        f"{module_name} no longer contains {pattern!r}: megatron-core changed; "
        f"re-check whether cpu_support patch {patch_name!r} is still needed")


def test_apply_is_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_support, "_applied", False)
    assert cpu_support.apply() is False
    assert cpu_support.is_applied() is False


@pytest.fixture(scope="module")
def one_rank_world():
    cpu_support.apply()
    store = dist.TCPStore("127.0.0.1", free_port(), world_size=1, is_master=True)
    # A store rather than MASTER_* variables: those would leak into every later test's
    # subprocesses (a single-process launcher.train takes MASTER_PORT from its environment).
    dist.init_process_group("gloo", rank=0, world_size=1, store=store, timeout=timedelta(seconds=60))
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_rng_tracker_forks_a_separate_cpu_stream(one_rank_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    torch.manual_seed(7)
    outer_expected = torch.rand(3)
    torch.manual_seed(7)
    with get_cuda_rng_tracker().fork():
        first = torch.rand(3)
    outer = torch.rand(3)
    assert torch.equal(outer, outer_expected), "fork must restore the default generator"
    with get_cuda_rng_tracker().fork():
        second = torch.rand(3)
    assert not torch.equal(first, second), "the forked stream must advance"
    model_parallel_cuda_manual_seed(123)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first), "same seed, same forked stream"


def test_stream_stand_ins_work(one_rank_world):
    stream = torch.cuda.Stream()
    assert torch.cuda.current_stream() == stream  # so megatron takes the no-side-stream path
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass


def test_current_device_is_the_cpu(one_rank_world):
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_router_gating_linear_runs_without_te(one_rank_world):
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    inp = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)
    out = router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(out, inp @ weight.t())
    out.sum().backward()
    assert weight.grad is not None


def test_split_sizes_come_back_as_numpy(one_rank_world):
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 0, 2]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 0, 2]


def test_fp32_optimizer_builds_on_cpu(one_rank_world):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.ones(2))
    opt = FP32Optimizer(torch.optim.AdamW([param]), OptimizerConfig(lr=0.1), lambda *_: None)
    assert opt.get_loss_scale().device.type == "cpu"


def test_grad_norm_and_clipping_match_torch(one_rank_world):
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    norm = clip_grads.get_grad_norm_fp32([p.grad for p in params])
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in reference])).item()
    assert norm == pytest.approx(expected, rel=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_synchronize_is_harmless(one_rank_world):
    # Unpatched, this raises "Torch not compiled with CUDA enabled" on a CPU build.
    assert torch.cuda.synchronize() is None


def test_default_causal_mask_on_cpu(one_rank_world):
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())
