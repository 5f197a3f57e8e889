"""Host syncs of the AnyExperts layer on CUDA: the split sizes reach the host once per forward.

Untested here (no GPU on the CPU machines); tools/gpu_check.sh runs it on a lent GPU. torch's
sync debug mode warns at every operation that waits for the GPU (a device-to-host copy, .item(),
.tolist(), nonzero, ...): the dispatcher's per-expert counts must be the only one in a forward
that records no statistics, and the backward must have none.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from anyexperts.moe import stats
from tests.test_anyexperts_layer import build_layer, no_process_groups, transformer_config


def _syncs(run) -> list[str]:
    """Messages of the synchronizing CUDA operations that run() performs."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_anyexperts_layer_syncs_once_per_forward_and_never_in_backward(dtype):
    from anyexperts import AnyExpertsConfig

    config = transformer_config(num_moe_experts=8, hidden_size=64, num_attention_heads=4, moe_ffn_hidden_size=128,
                                params_dtype=dtype, moe_router_dtype="fp32")
    torch.manual_seed(0)
    # The defaults: learned allocation, virtual slots, budget and load-balance losses.
    layer = build_layer(config, AnyExpertsConfig(), pg_collection=no_process_groups()).cuda()
    layer.train()
    hidden_SBH = torch.randn(128, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    stats.record_training(False)  # a step the trainer does not log
    try:
        layer(hidden_SBH)[0].float().sum().backward()  # warm-up: the expert path is chosen once
        outputs = []
        forward = _syncs(lambda: outputs.append(layer(hidden_SBH)[0]))
        backward = _syncs(lambda: outputs[0].float().sum().backward())
    finally:
        stats.record_training(True)
    assert len(forward) == 1, forward
    assert backward == [], backward
