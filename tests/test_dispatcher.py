"""VariableSlotAllToAll on 1, 2 and 4 gloo ranks (EP=1/2/4, and EP=2 x DP=2 on 4 ranks).

    OMP_NUM_THREADS=1 python -m pytest tests/test_dispatcher.py -q

Each distributed test spawns its ranks once and runs every routing case inside, because a
spawn (imports of torch and megatron) costs more than the cases. Every rank regenerates
every rank's routing from seeds, so each rank knows exactly which rows it must receive.
Checks per case: round trip (identity experts, gates of 1) forward and backward exactly;
outputs and gradients (hidden, gates, expert weights) against a dense float64 reference
within 1e-6 (float64, loop path) or 1e-5 (float32, torch._grouped_mm); bytes sent exactly;
at EP=2, equality with megatron's MoEAlltoAllTokenDispatcher + SequentialMLP; and on 4
ranks, GroupedExperts' dist_checkpointing saved at EP=4 and loaded at EP=2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anyexperts.moe.dispatcher import VariableSlotAllToAll, routing_to_dense
from tests.distributed import run_distributed

HIDDEN, FFN, SLOTS = 8, 4, 3
CASES = ("random", "random_sparse", "random_dense", "no_real_slot", "same_expert", "rank0_sends_nothing",
         "idle_experts", "rank1_no_tokens", "fixed_topk")


def make_routing(case: str, rank: int, num_experts: int, num_tokens: int = 12, *, dtype=torch.float64):
    """(hidden_TH, expert_TK, gate_TK) of one rank for a named case; deterministic per rank."""
    gen = torch.Generator().manual_seed(1000 * rank + CASES.index(case))
    if case == "rank1_no_tokens" and rank == 1:
        num_tokens = 0
    hidden_TH = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=dtype)
    # Distinct experts per token (as a router gives), then some slots made non-real.
    expert_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:SLOTS] for _ in range(num_tokens)]) \
        if num_tokens else torch.empty(0, SLOTS, dtype=torch.int64)
    gate_TK = torch.rand(num_tokens, SLOTS, generator=gen, dtype=dtype)
    if case != "fixed_topk":
        non_real = {"random_sparse": 0.7, "random_dense": 0.1}.get(case, 0.35)
        expert_TK[torch.rand(num_tokens, SLOTS, generator=gen) < non_real] = -1
    if case == "no_real_slot":
        expert_TK[::3] = -1
    elif case == "same_expert":
        expert_TK[:] = -1
        expert_TK[:, 1] = num_experts - 1
    elif case == "rank0_sends_nothing" and rank == 0:
        expert_TK[:] = -1
    elif case == "idle_experts":
        # Only experts 0 and 1 are used: other experts (and ranks at EP>1) get zero rows.
        expert_TK = torch.where(expert_TK >= 0, expert_TK % 2, -1)
        expert_TK[:, 1] = torch.where(expert_TK[:, 0] == 0, 1, 0)  # keep ids distinct per token
        expert_TK[:, 2] = -1
    return hidden_TH, expert_TK, gate_TK


def global_weights(num_experts: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    fc1_EHF = torch.randn(num_experts, HIDDEN, 2 * FFN, generator=gen, dtype=dtype) / HIDDEN ** 0.5
    fc2_EFH = torch.randn(num_experts, FFN, HIDDEN, generator=gen, dtype=dtype) / FFN ** 0.5
    return fc1_EHF, fc2_EFH


def dense_reference(hidden_TH, expert_TK, gate_TK, fc1_EHF, fc2_EFH):
    """y_t = sum over real slots k of gate_tk * SwiGLU-FFN_{e_tk}(h_t), token by token."""
    rows = []
    for t in range(hidden_TH.shape[0]):
        y = hidden_TH[t] * 0  # connected to the graph even for a token with no real slot
        for k in range(expert_TK.shape[1]):
            e = int(expert_TK[t, k])
            if e >= 0:
                gate, linear = (hidden_TH[t] @ fc1_EHF[e]).chunk(2)
                y = y + gate_TK[t, k] * ((F.silu(gate) * linear) @ fc2_EFH[e])
        rows.append(y)
    return torch.stack(rows) if rows else hidden_TH * 0


def _ep_group():
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_group()


def _check_case(case, rank, ep_group, num_experts, dtype, expert_path, tol):
    import torch.distributed as dist
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.experts import GroupedExperts

    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    local = num_experts // ep_size
    ep_ranks = dist.get_process_group_ranks(ep_group)
    # Every EP peer's routing, so the expected received rows and bytes are known exactly.
    routings = [make_routing(case, r, num_experts, dtype=dtype) for r in ep_ranks]
    hidden_TH, expert_TK, gate_TK = (x.clone() for x in routings[ep_rank])
    hidden_TH.requires_grad_(True)
    gate_TK.requires_grad_(True)
    dispatcher = VariableSlotAllToAll(num_experts=num_experts, ep_group=ep_group)

    # Round trip: experts = identity times the gate, gates of 1 -> hidden x (real slots per token).
    ones_TK = torch.ones_like(gate_TK, requires_grad=True)
    tokens_NH, counts_L, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, ones_TK)
    assert counts_L.dtype == torch.int64 and counts_L.device.type == "cpu" and counts_L.shape == (local,)
    owner_of = lambda e: e // local  # noqa: E731
    mine = [e for e in range(num_experts) if owner_of(e) == ep_rank]
    expected_counts = [sum(int((r[1] == e).sum()) for r in routings) for e in mine]
    assert counts_L.tolist() == expected_counts, (case, counts_L, expected_counts)
    # Rows of each local expert are exactly the hidden rows routed to it (as multisets).
    start = 0
    for e, count in zip(mine, expected_counts):
        want = torch.cat([r[0][(r[1] == e).any(1)] for r in routings])
        got = tokens_NH[start:start + count].detach()
        assert torch.equal(got[torch.argsort(got[:, 0])], want[torch.argsort(want[:, 0])]), (case, e)
        start += count
    real_per_token_T = (expert_TK >= 0).sum(1, keepdim=True).to(dtype)
    y_TH = dispatcher.combine(tokens_NH * probs_N.unsqueeze(-1))
    assert torch.equal(y_TH, hidden_TH.detach() * real_per_token_T), case
    grad_TH = torch.randn_like(y_TH)
    grad_h, grad_ones = torch.autograd.grad(y_TH, (hidden_TH, ones_TK), grad_TH)
    assert torch.equal(grad_h, grad_TH * real_per_token_T), case
    want_gate_grad = torch.where(expert_TK >= 0, (hidden_TH.detach() * grad_TH).sum(1, keepdim=True), 0)
    torch.testing.assert_close(grad_ones, want_gate_grad, rtol=0, atol=1e-12)

    # Bytes: hidden rows only, each direction exactly.
    row_bytes = HIDDEN * hidden_TH.element_size()
    sent_remote = int(((expert_TK >= 0) & (owner_of(expert_TK) != ep_rank)).sum())
    recv_remote = sum(int((owner_of(r[1]) == ep_rank).sum()) for i, r in enumerate(routings) if i != ep_rank)
    assert dispatcher.last_dispatch_bytes_sent == sent_remote * row_bytes, case
    assert dispatcher.last_combine_bytes_sent == recv_remote * row_bytes, case
    assert dispatcher.last_bytes_sent == (sent_remote + recv_remote) * row_bytes

    # Against the dense reference with real SwiGLU experts.
    fc1_EHF, fc2_EFH = global_weights(num_experts, dtype)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=num_experts,
                               ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                               params_dtype=dtype, expert_model_parallel_size=ep_size)
    experts = GroupedExperts(local, config, expert_path=expert_path)
    with torch.no_grad():
        experts.fc1_weight.copy_(fc1_EHF[mine])
        experts.fc2_weight.copy_(fc2_EFH[mine])
    tokens_NH, counts_L, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
    out_NH, bias = experts(tokens_NH, counts_L, probs_N)
    assert bias is None
    y_TH = dispatcher.combine(out_NH)
    grads = torch.autograd.grad(y_TH, (hidden_TH, gate_TK, experts.fc1_weight, experts.fc2_weight), grad_TH,
                                allow_unused=False)
    fc1_ref, fc2_ref = fc1_EHF.clone().requires_grad_(True), fc2_EFH.clone().requires_grad_(True)
    h_ref, g_ref = hidden_TH.detach().clone().requires_grad_(True), gate_TK.detach().clone().requires_grad_(True)
    y_ref = dense_reference(h_ref, expert_TK, g_ref, fc1_ref, fc2_ref)
    ref_grads = list(torch.autograd.grad(y_ref, (h_ref, g_ref, fc1_ref, fc2_ref), grad_TH.to(dtype), allow_unused=True))
    ref_grads = [torch.zeros_like(w) if g is None else g for g, w in zip(ref_grads, (h_ref, g_ref, fc1_ref, fc2_ref))]
    # Expert weights see the tokens of the whole EP group: sum the reference weight grads.
    for g in ref_grads[2:]:
        dist.all_reduce(g, group=ep_group)
    torch.testing.assert_close(y_TH, y_ref, rtol=0, atol=tol)
    # Non-real slots get a zero gate gradient.
    for got, want in zip(grads, (ref_grads[0], ref_grads[1], ref_grads[2][mine], ref_grads[3][mine])):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert torch.all(grads[1][expert_TK < 0] == 0)
    return case


def _run_all_cases(rank, world_size, num_experts, dtype, expert_path, tol):
    ep_group = _ep_group()
    return [_check_case(case, rank, ep_group, num_experts, dtype, expert_path, tol) for case in CASES]


def test_single_rank_without_group():
    """ep_group=None: no collectives at all; same reference check as the distributed cases."""
    hidden_TH, expert_TK, gate_TK = make_routing("random", 0, 4)
    dispatcher = VariableSlotAllToAll(num_experts=4, ep_group=None)
    tokens_NH, counts_L, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
    fc1_EHF, fc2_EFH = global_weights(4)
    expert_N = torch.repeat_interleave(torch.arange(4), counts_L)
    gate, linear = torch.bmm(tokens_NH.unsqueeze(1), fc1_EHF[expert_N]).squeeze(1).chunk(2, -1)
    out_NH = torch.bmm((F.silu(gate) * linear * probs_N[:, None]).unsqueeze(1), fc2_EFH[expert_N]).squeeze(1)
    y_TH = dispatcher.combine(out_NH)
    want_TH = dense_reference(hidden_TH, expert_TK, gate_TK, fc1_EHF, fc2_EFH)
    torch.testing.assert_close(y_TH, want_TH, rtol=0, atol=1e-12)
    assert dispatcher.last_bytes_sent == 0
    assert counts_L.sum() == int((expert_TK >= 0).sum()) == tokens_NH.shape[0]


@pytest.mark.slow
def test_world_1():
    (results,) = run_distributed(_run_all_cases, 1, args=(4, torch.float64, "loop", 1e-6), expert_parallel_size=1)
    assert results == list(CASES)


@pytest.mark.slow
def test_world_2_float64_blocked_and_float32_grouped_mm():
    results = run_distributed(_both_world_2, 2, expert_parallel_size=2)
    assert all(r[-1] == "megatron" and len(r) == 2 * len(CASES) + 1 for r in results)


def _both_world_2(rank, world_size):
    return (_run_all_cases(rank, world_size, 4, torch.float64, "blocked", 1e-6)
            + _run_all_cases(rank, world_size, 4, torch.float32, "grouped_mm", 1e-5)
            + [_compare_megatron(rank)])


def _grouped_experts_at_current_ep(num_experts, dtype=torch.float64):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.experts import GroupedExperts

    ep_size = parallel_state.get_expert_model_parallel_world_size()
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=num_experts,
                               ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                               params_dtype=dtype, expert_model_parallel_size=ep_size)
    return GroupedExperts(num_experts // ep_size, config)


def _world_4_both_layouts(rank, world_size, checkpoint_dir):
    """EP=4, then EP=2 x DP=2 in the same ranks (one spawn: start-up dominates the runtime).
    With EP=2 x DP=2 the groups {0,1} and {2,3} exchange independently and expert grads
    sum over the EP group only. Between the two, GroupedExperts' sharded checkpoint is saved
    at EP=4 and loaded at EP=2."""
    from megatron.core import dist_checkpointing, parallel_state

    results = _run_all_cases(rank, world_size, 8, torch.float64, "loop", 1e-6)
    fc1_EHF, fc2_EFH = global_weights(8)
    saved = _grouped_experts_at_current_ep(8)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    mine = slice(2 * ep_rank, 2 * ep_rank + 2)
    with torch.no_grad():
        saved.fc1_weight.copy_(fc1_EHF[mine])
        saved.fc2_weight.copy_(fc2_EFH[mine])
    dist_checkpointing.save(saved.sharded_state_dict(prefix="experts."), checkpoint_dir)

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    assert torch.distributed.get_world_size(_ep_group()) == 2
    loaded = _grouped_experts_at_current_ep(8)
    state = dist_checkpointing.load(loaded.sharded_state_dict(prefix="experts."), checkpoint_dir)
    loaded.load_state_dict({k.removeprefix("experts."): v for k, v in state.items()})
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    mine = slice(4 * ep_rank, 4 * ep_rank + 4)
    assert torch.equal(loaded.fc1_weight, fc1_EHF[mine]) and torch.equal(loaded.fc2_weight, fc2_EFH[mine])
    return results + _run_all_cases(rank, world_size, 4, torch.float64, "blocked", 1e-6)


@pytest.mark.slow
def test_world_4_expert_parallel_4_and_2x2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    results = run_distributed(_world_4_both_layouts, 4, args=(str(tmp_path / "ckpt"),), expert_parallel_size=4)
    assert all(len(r) == 2 * len(CASES) for r in results)


def _compare_megatron(rank):
    """Fixed top-k at EP=2: ours (dispatch + GroupedExperts + combine) == megatron's alltoall
    dispatcher + SequentialMLP with the same weights, outputs and gradients (float32)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.experts import GroupedExperts

    num_experts, ep_size = 4, 2
    local = num_experts // ep_size
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=num_experts,
                               ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                               expert_model_parallel_size=ep_size, moe_router_topk=SLOTS,
                               moe_token_dispatcher_type="alltoall")
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(3)  # same weights on both ranks is fine: each holds its own experts
    seq_mlp = SequentialMLP(local, config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                            pg_collection=pgs)
    ours = GroupedExperts(local, config, pg_collection=pgs).load_from_sequential_mlp(seq_mlp)
    assert all(p.allreduce is False for p in ours.parameters())
    hidden_TH, expert_TK, gate_TK = make_routing("fixed_topk", rank, num_experts, dtype=torch.float32)
    grad_TH = torch.randn(hidden_TH.shape, generator=torch.Generator().manual_seed(rank))

    h1, g1 = hidden_TH.clone().requires_grad_(True), gate_TK.clone().requires_grad_(True)
    dispatcher = VariableSlotAllToAll(num_experts=num_experts, ep_group=pgs.ep)
    tokens_NH, counts_L, probs_N = dispatcher.dispatch(h1, expert_TK, g1)
    y1 = dispatcher.combine(ours(tokens_NH, counts_L, probs_N)[0])
    y1.backward(grad_TH)

    h2, g2 = hidden_TH.clone().requires_grad_(True), gate_TK.clone().requires_grad_(True)
    probs_TE, routing_map_TE = routing_to_dense(expert_TK, g2, num_experts)
    mdisp = MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config=config,
                                       pg_collection=pgs)
    x, p = mdisp.dispatch_preprocess(h2, routing_map_TE, probs_TE)
    x, p = mdisp.token_dispatch(x, p)
    x, counts, p = mdisp.dispatch_postprocess(x, p)
    out, _ = seq_mlp(x, counts, p)
    y2 = mdisp.combine_postprocess(mdisp.token_combine(mdisp.combine_preprocess(out)))
    y2.backward(grad_TH)

    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(g1.grad, g2.grad, rtol=0, atol=1e-5)
    for e, mlp in enumerate(seq_mlp.local_experts):
        torch.testing.assert_close(ours.fc1_weight.grad[e], mlp.linear_fc1.weight.grad.t(), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.fc2_weight.grad[e], mlp.linear_fc2.weight.grad.t(), rtol=0, atol=1e-5)
    return "megatron"
