"""GroupedExperts: against megatron's SequentialMLP with the same weights, and its own pieces.

    OMP_NUM_THREADS=1 python -m pytest tests/test_experts.py -q

The SequentialMLP comparisons need megatron's process groups, so they run in one spawned
rank (tests/distributed.py); the gradient checks of the custom autograd functions run here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

HIDDEN, FFN = 8, 12


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=4, ffn_hidden_size=FFN,
                  moe_ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  use_cpu_initialization=True, params_dtype=torch.float32)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def test_loop_grouped_mm_gradcheck():
    from anyexperts.moe.experts import _LoopGroupedMM

    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _LoopGroupedMM.apply(a, b, [2, 0, 5]), (x, w))


def test_weighted_swiglu_gradcheck():
    from anyexperts.moe.experts import _WeightedSwiGLU

    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    p = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WeightedSwiGLU.apply, (x, p))
    a, b = x.chunk(2, -1)
    torch.testing.assert_close(_WeightedSwiGLU.apply(x, p), F.silu(a) * b * p[:, None], rtol=0, atol=1e-15)


def test_grouped_mm_and_loop_agree_and_fallback_on_odd_shapes():
    from anyexperts.moe.experts import GroupedExperts, grouped_mm_supported

    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    experts = GroupedExperts(4, _config())
    assert grouped_mm_supported(torch.empty(1, HIDDEN), experts.fc1_weight)
    x, p = torch.randn(9, HIDDEN, requires_grad=True), torch.rand(9, requires_grad=True)
    results = []
    for expert_path in ("grouped_mm", "loop", "blocked"):  # blocked: one block per expert here
        experts.expert_path = expert_path
        experts.zero_grad()
        out, _ = experts(x, torch.tensor(counts), p)
        grads = torch.autograd.grad(out, (x, p, experts.fc1_weight, experts.fc2_weight), torch.randn(
            out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Hidden 6 in fp32 is a 24-byte row stride: grouped_mm would reject it, the loop takes over.
    odd = GroupedExperts(2, _config(hidden_size=6))
    assert not grouped_mm_supported(torch.empty(1, 6), odd.fc1_weight)
    out, _ = odd(torch.randn(4, 6), [1, 3], torch.rand(4))
    assert out.shape == (4, 6) and torch.isfinite(out).all()


def test_init_and_allreduce_marks():
    from anyexperts.moe.experts import GroupedExperts

    experts = GroupedExperts(3, _config(init_method=lambda w: torch.nn.init.constant_(w, 0.25),
                                        output_layer_init_method=lambda w: torch.nn.init.constant_(w, -0.5)))
    assert torch.all(experts.fc1_weight == 0.25) and torch.all(experts.fc2_weight == -0.5)
    assert experts.fc1_weight.shape == (3, HIDDEN, 2 * FFN) and experts.fc2_weight.shape == (3, FFN, HIDDEN)
    # As megatron marks expert linears: allreduce only without expert parallelism.
    assert all(p.allreduce is True for p in experts.parameters())
    ep2 = GroupedExperts(2, _config(expert_model_parallel_size=2))
    assert all(p.allreduce is False for p in ep2.parameters())
    with pytest.raises(ValueError, match="tokens_per_expert"):
        experts(torch.randn(4, HIDDEN), [1, 1, 1], torch.rand(4))


def test_biases_follow_megatron_expert_semantics():
    """out = p * (W2 act(W1 x + b1)) + p * b2, as megatron's expert MLP (mlp.py: the output bias
    is scaled by the gate). Checked by hand: SequentialMLP with biases fails at EP=1 on CPU
    (mlp.py:247 in-place add on a custom Function's view, a megatron bug)."""
    from anyexperts.moe.experts import GroupedExperts

    torch.manual_seed(2)
    experts = GroupedExperts(2, _config(params_dtype=torch.float64, gated_linear_unit=False, activation_func=F.gelu,
                                        add_bias_linear=True), expert_path="loop")
    with torch.no_grad():
        experts.fc1_bias.normal_()
        experts.fc2_bias.normal_()
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    p = torch.rand(5, dtype=torch.float64)
    out, _ = experts(x, [2, 3], p)
    expert_N = torch.tensor([0, 0, 1, 1, 1])
    fc1 = torch.einsum("nh,nhf->nf", x, experts.fc1_weight[expert_N]) + experts.fc1_bias[expert_N]
    fc2 = torch.einsum("nf,nfh->nh", F.gelu(fc1), experts.fc2_weight[expert_N]) + experts.fc2_bias[expert_N]
    want = p[:, None] * fc2
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda b1, b2: experts(x, [2, 3], p)[0], (experts.fc1_bias, experts.fc2_bias))


def _against_sequential_mlp(rank, world_size):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from anyexperts.moe.experts import GroupedExperts

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    variants = [  # (name, config overrides, counts, dtype, expert_path, tolerance)
        ("swiglu fp32 grouped_mm", {}, [5, 0, 7], torch.float32, "grouped_mm", 1e-5),
        ("swiglu fp32 loop", {}, [5, 0, 7], torch.float32, "loop", 1e-5),
        ("swiglu fp32 blocked", {}, [5, 0, 7], torch.float32, "blocked", 1e-5),
        ("swiglu fp64 loop", dict(params_dtype=torch.float64), [4, 6, 0], torch.float64, "loop", 1e-12),
        ("swiglu fp64 blocked", dict(params_dtype=torch.float64), [4, 6, 0], torch.float64, "blocked", 1e-12),
        ("gelu fp64 loop", dict(params_dtype=torch.float64, gated_linear_unit=False, activation_func=F.gelu),
         [3, 2, 4], torch.float64, "loop", 1e-12),
        ("geglu fp32 grouped_mm", dict(activation_func=F.gelu), [0, 6, 2], torch.float32, "grouped_mm", 1e-5),
        ("no tokens", {}, [0, 0, 0], torch.float32, "grouped_mm", 0.0),
        ("no tokens blocked", {}, [0, 0, 0], torch.float32, "blocked", 0.0),
        ("one expert", {}, [6], torch.float32, "grouped_mm", 1e-5),
        ("one expert auto", {}, [6], torch.float32, "auto", 1e-5),
    ]
    done = []
    for name, overrides, counts, dtype, expert_path, tol in variants:
        torch.manual_seed(11)
        config = _config(**overrides)
        seq_mlp = SequentialMLP(len(counts), config, submodules, pg_collection=pgs)
        ours = GroupedExperts(len(counts), config, pg_collection=pgs, expert_path=expert_path)
        ours.load_from_sequential_mlp(seq_mlp)
        num_rows = sum(counts)
        x = torch.randn(num_rows, HIDDEN, dtype=dtype)
        p = torch.rand(num_rows, dtype=dtype)
        grad = torch.randn(num_rows, HIDDEN, dtype=dtype)
        results = []
        for module in (ours, seq_mlp):
            xi, pi = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
            out, bias = module(xi, torch.tensor(counts), pi)
            assert bias is None
            out.backward(grad)
            results.append((out, xi.grad, pi.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=name)
        for e, mlp in enumerate(seq_mlp.local_experts):
            pairs = ((ours.fc1_weight, mlp.linear_fc1.weight), (ours.fc2_weight, mlp.linear_fc2.weight))
            for ours_p, theirs_p in pairs:
                torch.testing.assert_close(ours_p.grad[e], theirs_p.grad.t(), rtol=0, atol=tol, msg=name)
        if num_rows == 0:  # idle experts still get (zero) weight grads, as megatron's do
            assert torch.count_nonzero(ours.fc1_weight.grad) == 0
        done.append(name)
    return done


@pytest.mark.slow
def test_against_megatron_sequential_mlp():
    (done,) = run_distributed(_against_sequential_mlp, 1, expert_parallel_size=1)
    assert len(done) == 11


@pytest.mark.gpu
def test_cuda_bf16_grouped_mm_matches_loop():
    """Untested here (no GPU on the CPU machines): bf16 grouped_mm on CUDA against the loop."""
    from anyexperts.moe.dispatcher import VariableSlotAllToAll
    from anyexperts.moe.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(4, _config(hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=128,
                                        params_dtype=torch.bfloat16)).cuda()
    hidden_TH = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    expert_TK = torch.randint(-1, 4, (32, 3), device="cuda")
    gate_TK = torch.rand(32, 3, device="cuda")
    dispatcher = VariableSlotAllToAll(num_experts=4, ep_group=None)
    outs = []
    for expert_path in ("auto", "loop"):
        experts.expert_path = expert_path
        tokens_NH, counts, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
        outs.append(dispatcher.combine(experts(tokens_NH, counts, probs_N)[0]).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
