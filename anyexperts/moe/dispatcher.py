"""Expert-parallel all-to-all dispatch for a variable number of real expert slots per token.

Each token has K slots (K = K_max, the widest any token may use); a slot holds a GLOBAL real
expert id or -1 (a virtual, unused or dropped slot). Only real slots travel:

    dispatcher = VariableSlotAllToAll(num_experts=E, ep_group=group)   # group None: one rank
    tokens_NH, tokens_per_local_expert, probs_N = dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
    expert_out_NH, _ = experts(tokens_NH, tokens_per_local_expert, probs_N)  # experts apply gates
    y_TH = dispatcher.combine(expert_out_NH)          # sum over each token's real slots

Data path (one host sync, for the split sizes):
1. A sort key per slot: its expert id, or E for a non-real slot, so that one stable sort
   orders the real slots by expert (= by destination rank, since rank r owns the contiguous
   experts [r*E_local, (r+1)*E_local)) and pushes non-real slots past the end, where the
   slice cuts them off. Per-expert counts come from a scatter-add (no host sync on GPU).
2. The counts are exchanged with a small all_to_all_single while the sort runs; both count
   vectors then go to the host together: the only host-device sync.
3. One index_select gathers the real slots' rows; ONE all_to_all_single with uneven splits
   moves them (and the per-row gates ride in a second, concurrent call of 4 bytes per row:
   see "Bytes" below). Received rows are rank-major; one precomputed gather makes them
   expert-major (skipped when there is one local expert or one rank).
4. combine: the inverse gather, ONE all_to_all_single back, one index_add_ into [T, H].
Autograd flows to the hidden states and the gates; backward runs the mirrored exchanges
(the rank/expert-major reorders backward by gathering with the inverse permutation).

Bytes: `last_dispatch_bytes_sent` = (real slots this rank sent to other ranks) x H x element
size; `last_combine_bytes_sent` = (rows this rank returned to other ranks) x H x element size;
`last_bytes_sent` is their sum (both directions of one forward). Backward sends the same
amounts again, mirrored, and is not counted. Metadata is counted apart in
`last_metadata_bytes_sent`: the gates (rows sent to other ranks x gate element size) and the
counts exchange ((ep - 1) x E_local x 8 bytes).

Rebalancing (`rebalance=RebalanceConfig(enable=True)`, plan in rebalance.py): the counts
exchange becomes an all_gather of every rank's per-expert counts, from which every rank
computes the same plan. An inactive plan (balanced step) takes the path above. An active
one sends each slot to the rank that computes it, which may be a helper of the expert's
home; the received rows are ordered by COMPUTED expert: this rank's own experts first, then
the borrowed ones (`borrowed_experts`, ascending). `borrow_weights(expert weights)` then
brings the borrowed experts' weights (one all_to_all_single over per-expert rows); its
backward returns the helpers' weight gradients home, where autograd adds them to the home
rank's own. `last_plan` keeps the step's plan for the statistics.

Tests: tests/test_dispatcher.py, tests/test_rebalance.py. Benchmark: tools/bench_dispatcher.py,
tools/bench_balancer.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from anyexperts.moe.rebalance import RebalanceConfig, RebalancePlan, plan_rebalance


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single over dim 0 of one or more tensors with the same uneven splits.

    All tensors are launched asynchronously before any is waited on. Backward sends the
    gradients back with the splits swapped. (Measured on gloo, 2 ranks: the gates' call adds
    about 1-4 ms at 1k-8k rows; packing them as an extra column of the row buffer was slower,
    as the pack and unpack copies cost more than the call.)
    """

    @staticmethod
    def forward(ctx, group, output_splits, input_splits, *tensors):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _exchange(group, output_splits, input_splits, tensors)

    @staticmethod
    def backward(ctx, *grads):
        grads = tuple(g.contiguous() for g in grads)
        return (None, None, None, *_exchange(ctx.group, ctx.input_splits, ctx.output_splits, grads))


def _exchange(group, output_splits: list[int], input_splits: list[int], tensors) -> tuple:
    num_out = sum(output_splits)
    outs, works = [], []
    for tensor in tensors:
        out = tensor.new_empty((num_out, *tensor.shape[1:]))
        works.append(dist.all_to_all_single(out, tensor.contiguous(), output_splits, input_splits,
                                            group=group, async_op=True))
        outs.append(out)
    for work in works:
        work.wait()
    return tuple(outs)


class _AnchoredAllToAllRows(torch.autograd.Function):
    """_AllToAllRows of one tensor that also returns a zero scalar `anchor` for the caller to add
    to the layer's output. The output then depends on this exchange on every rank, so every rank
    enters its backward exchange, also a rank whose received rows feed nothing (zero rows)."""

    @staticmethod
    def forward(ctx, group, output_splits, input_splits, rows):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        (received,) = _exchange(group, output_splits, input_splits, (rows,))
        return received, rows.new_zeros(())

    @staticmethod
    def backward(ctx, grad_received, grad_anchor):
        (grad_rows,) = _exchange(ctx.group, ctx.input_splits, ctx.output_splits, (grad_received.contiguous(),))
        return None, None, None, grad_rows


class _PermuteRows(torch.autograd.Function):
    """out = x[perm] for a bijective perm; backward gathers with the inverse permutation instead
    of autograd's generic zeros + index_add_ (a fill and a scatter saved per use)."""

    @staticmethod
    def forward(ctx, x, perm, inverse_perm):
        ctx.save_for_backward(inverse_perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse_perm,) = ctx.saved_tensors
        return grad.index_select(0, inverse_perm), None, None


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Small host-built index tensors to the device without a stream sync: a plain copy from
    pageable memory synchronises on CUDA, a non-blocking one from pinned memory does not."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def _reorder_segments(counts_G: torch.Tensor, order_G: torch.Tensor, num_rows: int, device) -> torch.Tensor:
    """Row gather index that lays the segments of a buffer (counts_G rows each, in order) out in
    the segment order order_G; every segment must appear once in order_G."""
    counts_G = counts_G.reshape(-1)
    src_start_G = _exclusive_cumsum(counts_G)[order_G]
    counts_out_G = counts_G[order_G]
    shift = torch.repeat_interleave(host_to_device(src_start_G - _exclusive_cumsum(counts_out_G), device),
                                    host_to_device(counts_out_G, device), output_size=num_rows)
    return torch.arange(num_rows, device=device) + shift


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _segment_permutation(counts_AB: torch.Tensor, num_rows: int, device) -> torch.Tensor:
    """Row gather index that turns segments laid out (a, b)-major into (b, a)-major order.

    counts_AB[a, b] rows form segment (a, b); in the source buffer segments follow row-major
    (a, b) order. Returns idx with out = src[idx] holding the segments in (b, a) order, built
    from segment starts with one repeat_interleave (no host sync: num_rows is known).
    """
    start_AB = _exclusive_cumsum(counts_AB.reshape(-1)).reshape(counts_AB.shape)
    counts_BA = counts_AB.t().reshape(-1)
    src_start_BA = start_AB.t().reshape(-1)
    dst_start_BA = _exclusive_cumsum(counts_BA)
    shift = torch.repeat_interleave(host_to_device(src_start_BA - dst_start_BA, device),
                                    host_to_device(counts_BA, device), output_size=num_rows)
    return torch.arange(num_rows, device=device) + shift


class VariableSlotAllToAll:
    """Dispatches real expert slots to the ranks owning the experts and brings results back.

    num_experts: global real experts E; rank r of ep_group owns [r*E/ep, (r+1)*E/ep).
    ep_group: the expert-parallel process group; None (or a group of one) means no exchange.
    State of one dispatch is kept here until its combine, as megatron's dispatchers do.
    """

    def __init__(self, *, num_experts: int, ep_group: Optional[ProcessGroup],
                 rebalance: Optional[RebalanceConfig] = None):
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if num_experts < 1 or num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} must be a positive multiple of the "
                             f"expert-parallel size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.last_dispatch_bytes_sent = 0
        self.last_combine_bytes_sent = 0
        self.last_metadata_bytes_sent = 0
        self._state: Optional[dict] = None
        if rebalance is not None:
            rebalance.validate(prefix="rebalance.")
        self.rebalance = rebalance if rebalance is not None and rebalance.enable else None
        # The last dispatch's plan (None without rebalancing or with one rank).
        self.last_plan: Optional[RebalancePlan] = None
        self.last_weight_bytes_sent = 0
        # Global ids of the experts this rank computes for other ranks in the current step.
        self.borrowed_experts: list[int] = []

    @property
    def last_bytes_sent(self) -> int:
        """Hidden-state bytes the last dispatch + combine sent to other ranks (both directions)."""
        return self.last_dispatch_bytes_sent + self.last_combine_bytes_sent

    # ----------------------------------------------------------------------------------------
    def dispatch(self, hidden_TH: torch.Tensor, expert_TK: torch.Tensor, gate_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (tokens_NH sorted by local expert, int64 CPU count per local expert, gate per row);
        under an active rebalancing plan the experts are this rank's, then `borrowed_experts`."""
        if expert_TK.dim() != 2 or gate_TK.shape != expert_TK.shape:
            raise ValueError(f"expert_TK {tuple(expert_TK.shape)} and gate_TK {tuple(gate_TK.shape)} "
                             "must both be [tokens, slots]")
        hidden_shape = hidden_TH.shape
        num_tokens, num_slots = expert_TK.shape
        hidden_TH = hidden_TH.reshape(-1, hidden_shape[-1])
        if hidden_TH.shape[0] != num_tokens:
            raise ValueError(f"hidden has {hidden_TH.shape[0]} tokens, routing has {num_tokens}")
        num_experts, ep_size, device = self.num_experts, self.ep_size, hidden_TH.device

        # 1. Sort key: expert id for real slots, E (sorted last, then cut off) for the rest.
        expert_S = expert_TK.reshape(-1).to(device=device, dtype=torch.int64)
        key_S = torch.where(expert_S >= 0, expert_S, num_experts)
        counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        counts_E1.scatter_add_(0, key_S, torch.ones_like(key_S))
        send_counts_E = counts_E1[:num_experts]

        # 2. Counts exchange, overlapped with the sort; then the one host sync for both.
        work, plan = None, None
        self.borrowed_experts, self.last_plan, self.last_weight_bytes_sent = [], None, 0
        if ep_size > 1 and self.rebalance is not None:
            counts_RE = torch.empty(ep_size * num_experts, dtype=torch.int64, device=device)
            work = dist.all_gather_into_tensor(counts_RE, send_counts_E, group=self.ep_group, async_op=True)
        elif ep_size > 1:
            recv_counts_RL = torch.empty(num_experts, dtype=torch.int64, device=device)
            work = dist.all_to_all_single(recv_counts_RL, send_counts_E, group=self.ep_group,
                                          async_op=True)
        order_S = torch.sort(key_S, stable=True).indices
        if work is not None and self.rebalance is not None:
            work.wait()
            counts_RE_host = counts_RE.cpu().view(ep_size, num_experts)
            plan = self.last_plan = plan_rebalance(counts_RE_host, self.rebalance)
            send_counts = counts_RE_host[self.ep_rank].tolist()
            own = slice(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)
            recv_counts = counts_RE_host[:, own].reshape(-1).tolist()
        elif work is not None:
            work.wait()
            host = torch.cat([send_counts_E, recv_counts_RL]).tolist()
            send_counts, recv_counts = host[:num_experts], host[num_experts:]
        else:
            send_counts = send_counts_E.tolist()
            recv_counts = send_counts
        if plan is not None and plan.active:
            return self._dispatch_rebalanced(plan, hidden_TH, gate_TK, order_S, num_slots, hidden_shape)

        # 3. Gather the real slots' rows (expert-major, hence destination-rank-major).
        num_real = sum(send_counts)
        slot_N = order_S[:num_real]
        token_N = torch.div(slot_N, num_slots, rounding_mode="floor")
        rows_NH = hidden_TH.index_select(0, token_N)
        gates_N = gate_TK.reshape(-1).to(device).index_select(0, slot_N)

        local = self.num_local_experts
        state = dict(token_N=token_N, num_tokens=num_tokens, hidden_shape=hidden_shape)
        if ep_size == 1:
            self._state = state
            self.last_dispatch_bytes_sent = self.last_combine_bytes_sent = 0
            self.last_metadata_bytes_sent = 0
            return rows_NH, torch.tensor(send_counts, dtype=torch.int64), gates_N

        recv_counts_RL_host = torch.tensor(recv_counts, dtype=torch.int64).view(ep_size, local)
        input_splits = split_sizes(send_counts, local)
        output_splits = recv_counts_RL_host.sum(1).tolist()
        num_recv = sum(output_splits)
        recv_MH, recv_gates_M = _AllToAllRows.apply(self.ep_group, output_splits, input_splits,
                                                    rows_NH, gates_N)
        # 4. Rank-major -> expert-major with one gather; combine uses the inverse.
        if local > 1:
            to_expert_major = _segment_permutation(recv_counts_RL_host, num_recv, device)
            to_rank_major = _segment_permutation(recv_counts_RL_host.t().contiguous(), num_recv, device)
            tokens_MH = _PermuteRows.apply(recv_MH, to_expert_major, to_rank_major)
            probs_M = _PermuteRows.apply(recv_gates_M, to_expert_major, to_rank_major)
        else:
            to_rank_major = None
            tokens_MH, probs_M = recv_MH, recv_gates_M

        state.update(input_splits=input_splits, output_splits=output_splits,
                     to_rank_major=to_rank_major, to_expert_major=to_expert_major if local > 1 else None)
        self._state = state
        row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
        sent_remote = num_real - input_splits[self.ep_rank]
        returned_remote = num_recv - output_splits[self.ep_rank]
        self.last_dispatch_bytes_sent = sent_remote * row_bytes
        self.last_combine_bytes_sent = returned_remote * row_bytes
        counts_sent = num_experts if self.rebalance is not None else local  # all_gather vs all_to_all
        self.last_metadata_bytes_sent = (sent_remote * gates_N.element_size()
                                         + (ep_size - 1) * counts_sent * send_counts_E.element_size())
        return tokens_MH, recv_counts_RL_host.sum(0), probs_M

    # ----------------------------------------------------------------------------------------
    def _dispatch_rebalanced(self, plan: RebalancePlan, hidden_TH: torch.Tensor, gate_TK: torch.Tensor,
                             order_S: torch.Tensor, num_slots: int, hidden_shape):
        """dispatch() under an active plan: slots go to the ranks that compute them."""
        me, ep_size, local, device = self.ep_rank, self.ep_size, self.num_local_experts, hidden_TH.device
        flows_SDE = plan.flows_SDE
        # Sorted by expert, each expert's slots split into destinations in ascending order:
        # segments (expert, destination); the exchange needs them destination-major.
        send_ED = flows_SDE[me].t().contiguous()
        num_real = int(send_ED.sum())
        to_destination_major = _segment_permutation(send_ED, num_real, device)
        slot_N = order_S[:num_real].index_select(0, to_destination_major)
        token_N = torch.div(slot_N, num_slots, rounding_mode="floor")
        rows_NH = hidden_TH.index_select(0, token_N)
        gates_N = gate_TK.reshape(-1).to(device).index_select(0, slot_N)
        input_splits = send_ED.sum(0).tolist()

        recv_SE = flows_SDE[:, me]
        output_splits = recv_SE.sum(1).tolist()
        num_recv = sum(output_splits)
        recv_MH, recv_gates_M = _AllToAllRows.apply(self.ep_group, output_splits, input_splits, rows_NH, gates_N)
        # Received segments are (source, expert)-major; computed experts are this rank's own
        # experts, then the borrowed ones, each with its sources in rank order.
        self.borrowed_experts = plan.borrowed(me)
        computed_X = list(range(me * local, (me + 1) * local)) + self.borrowed_experts
        num_experts = recv_SE.shape[1]
        order_XS = (torch.tensor(computed_X, dtype=torch.int64).unsqueeze(1)
                    + num_experts * torch.arange(ep_size).unsqueeze(0)).reshape(-1)
        to_expert_major = _reorder_segments(recv_SE, order_XS, num_recv, device)
        to_rank_major = _inverse_permutation(to_expert_major)
        tokens_MH = _PermuteRows.apply(recv_MH, to_expert_major, to_rank_major)
        probs_M = _PermuteRows.apply(recv_gates_M, to_expert_major, to_rank_major)
        self._state = dict(token_N=token_N, num_tokens=hidden_TH.shape[0], hidden_shape=hidden_shape,
                           input_splits=input_splits, output_splits=output_splits,
                           to_rank_major=to_rank_major, to_expert_major=to_expert_major, anchor=None)

        row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
        sent_remote = num_real - input_splits[me]
        self.last_dispatch_bytes_sent = sent_remote * row_bytes
        self.last_combine_bytes_sent = (num_recv - output_splits[me]) * row_bytes
        self.last_metadata_bytes_sent = (sent_remote * gates_N.element_size()
                                         + (ep_size - 1) * num_experts * 8)
        return tokens_MH, recv_SE[:, computed_X].sum(0), probs_M

    def borrow_weights(self, weights_L: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The borrowed experts' weights, one [B, ...] tensor per [E_local, ...] weight of this
        rank's experts (all of one dtype), for the experts of `borrowed_experts` in that order.

        Call after dispatch() under an active plan, on every rank (also one that lends or
        borrows nothing): it is a collective. Autograd returns the gradients home.
        """
        if self._state is None or self.last_plan is None or not self.last_plan.active:
            raise RuntimeError("borrow_weights() needs a preceding dispatch() with an active rebalancing plan")
        plan, me, local = self.last_plan, self.ep_rank, self.num_local_experts
        lent = plan.lent(me)  # helper-major, as the exchange needs
        lent_L = torch.tensor([expert - me * local for expert, _ in lent], dtype=torch.int64)
        input_splits = [0] * self.ep_size
        for _, helper in lent:
            input_splits[helper] += 1
        output_splits = [0] * self.ep_size
        for expert in self.borrowed_experts:
            output_splits[plan.home(expert)] += 1
        device = weights_L[0].device
        lent_L = host_to_device(lent_L, device)
        rows_LW = torch.cat([w.index_select(0, lent_L).reshape(len(lent), w[0].numel()) for w in weights_L], dim=1)
        received_BW, anchor = _AnchoredAllToAllRows.apply(self.ep_group, output_splits, input_splits, rows_LW)
        self._state["anchor"] = anchor
        self.last_weight_bytes_sent = rows_LW.numel() * rows_LW.element_size()
        num_borrowed = len(self.borrowed_experts)
        sizes = [w[0].numel() for w in weights_L]
        return [part.reshape(num_borrowed, *w.shape[1:])
                for part, w in zip(received_BW.split(sizes, dim=1), weights_L)]

    # ----------------------------------------------------------------------------------------
    def combine(self, expert_out_NH: torch.Tensor) -> torch.Tensor:
        """Returns the sum over each token's real slots, shaped like dispatch's hidden input."""
        if self._state is None:
            raise RuntimeError("combine() called without a preceding dispatch()")
        state, self._state = self._state, None
        if self.ep_size > 1:
            if state["to_rank_major"] is not None:
                expert_out_NH = _PermuteRows.apply(expert_out_NH, state["to_rank_major"], state["to_expert_major"])
            (expert_out_NH,) = _AllToAllRows.apply(self.ep_group, state["input_splits"],
                                                   state["output_splits"], expert_out_NH)
        hidden_size = expert_out_NH.shape[-1]
        # In place into fresh zeros: autograd records it, and no second [T, H] copy is made.
        y_TH = expert_out_NH.new_zeros(state["num_tokens"], hidden_size)
        y_TH.index_add_(0, state["token_N"], expert_out_NH)
        if state.get("anchor") is not None:
            y_TH = y_TH + state["anchor"]
        return y_TH.view(*state["hidden_shape"][:-1], hidden_size)


def routing_to_dense(expert_TK: torch.Tensor, gate_TK: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs_TE, routing_map_TE) in megatron's dense form, for comparisons with its dispatchers.

    Non-real slots scatter into an extra column E that is cut off, so they cannot overwrite a
    real entry. A token naming one expert twice keeps one entry (megatron has no such form).
    """
    num_tokens = expert_TK.shape[0]
    column_TK = torch.where(expert_TK >= 0, expert_TK, num_experts)
    routing_map_TE = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=expert_TK.device)
    routing_map_TE.scatter_(1, column_TK, True)
    probs_TE = torch.zeros(num_tokens, num_experts + 1, dtype=gate_TK.dtype, device=gate_TK.device)
    probs_TE = probs_TE.scatter(1, column_TK, gate_TK)
    return probs_TE[:, :num_experts], routing_map_TE[:, :num_experts]


def split_sizes(counts: Sequence[int], group_size: int) -> list[int]:
    """Sums consecutive runs of `group_size` counts (per-expert counts -> per-rank splits)."""
    return [sum(counts[i:i + group_size]) for i in range(0, len(counts), group_size)]
