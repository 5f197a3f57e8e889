"""How GroupedExperts computes its FFNs over one expert-sorted buffer, and which way is fastest.

    path = choose_path("auto", key, candidates, time_path)    # cached per shape, logged once
    out_NH = blocked_swiglu_experts(x_NH, probs_N, fc1_weight, fc2_weight, counts)   # path "blocked"

Paths (`moe.expert_path`, `GroupedExperts(expert_path=...)`):
  grouped_mm  torch._grouped_mm for fc1 and fc2 over the whole buffer, the weighted SwiGLU in
              between on the whole [N, 2F] buffer: fewest operator calls, so best when each
              expert has few rows (many experts, few tokens).
  loop        one mm per expert into slices of one output (experts.py `_LoopGroupedMM`);
              every dtype, and the fallback where grouped_mm's stride rules fail.
  blocked     per expert, per block of rows: fc1 -> weighted SwiGLU -> fc2 while the block's
              [rows, 2F] activations are still in cache, and the backward likewise per block
              (the SwiGLU recomputed from the saved fc1 output). On CPU the [N, 2F] buffers of
              the other paths do not fit in cache at a few thousand rows, and their elementwise
              passes are memory-bound; here they are not. SwiGLU without biases, fp32/fp64.
  auto        (the default) a rule of the shape, the same on every run: on CPU blocked where it
              can run and the experts average at least BLOCKED_MIN_ROWS_PER_EXPERT rows, else
              grouped_mm, else loop; on CUDA grouped_mm where its bf16 kernel runs, else loop.
              tools/bench_expert_paths.py times every path over a grid of shapes and reports
              what the rule loses against the fastest (docs/RESULTS.md).
  measure     on CPU: each available path timed (forward + backward on random rows with the
              same per-expert counts, the layer's weights copied, the global RNG untouched) the
              first time a shape is seen; the fastest is kept for the process unless it is within
              SWITCH_MARGIN of the first candidate. Timing noise can make two runs choose
              differently, and the paths round differently: a run that must repeat another bit
              for bit (a resumed or requeued job) should use auto or a fixed path.

Every choice is cached per shape key (device, dtype, experts, H, F, gated, grad, log2 of the
rows, threads) and logged once (auto: at INFO where its path differs from the one last logged
for the same shape at other row counts, else at DEBUG); rows within a factor of two share a key
and a choice, so a variable-slot layer, whose row count moves every step, does not switch
paths within a bucket.

Tests: tests/test_expert_paths.py. Benchmarks: tools/bench_expert_paths.py, tools/bench_layer.py.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

EXPERT_PATHS = ("auto", "measure", "grouped_mm", "loop", "blocked")
_BLOCKED_DTYPES = (torch.float32, torch.float64)
# Bytes of one block's fc1 output [rows, 2F] (512 rows at F = 512 in fp32). Measured on AMD EPYC
# (1 MiB L2 per core, 32 MiB L3), dispatcher + experts forward + backward at 1k-4k tokens x 8-64
# experts, top-4: 2 MiB blocks 0.4-3% faster than 1 MiB ones (fewer operator calls), 4 MiB mixed;
# 64-row blocks are slower (operator overhead), whole experts of thousands of rows too (cache).
BLOCK_BYTES = 2 << 20
_TIMING_REPEATS = 3
# auto's rule: below this many rows per expert the blocked path's per-block operator calls cost
# more than its cache reuse saves (tools/bench_expert_paths.py; docs/RESULTS.md).
BLOCKED_MIN_ROWS_PER_EXPERT = 64
# How much faster than the first candidate another path must time to be chosen.
SWITCH_MARGIN = 0.03


def block_rows(ffn_x2: int, element_size: int) -> int:
    return max(64, min(1024, BLOCK_BYTES // max(1, ffn_x2 * element_size)))


def _starts(counts: Sequence[int]) -> list[int]:
    starts, start = [], 0
    for count in counts:
        starts.append(start)
        start += count
    return starts


def _blocks(start: int, count: int, rows: int):
    """(lo, hi) row spans of one expert: about `rows` each, the count split evenly, so that no
    block is a small remainder (a 10-row matmul runs far below the machine's rate)."""
    if count == 0:
        return []
    num_blocks = max(1, round(count / rows))
    size = -(-count // num_blocks)
    return [(lo, min(lo + size, start + count)) for lo in range(start, start + count, size)]


def _widest_block(counts: Sequence[int], rows: int) -> int:
    return max((hi - lo for start, count in zip(_starts(counts), counts)
                for lo, hi in _blocks(start, count, rows)), default=0)


class _BlockedSwiGLUExperts(torch.autograd.Function):
    """out[rows of e] = (silu(x W1a) * (x W1b) * p) W2 per expert e, computed in row blocks.

    Saves x, p and the fc1 output h [N, 2F] (the grouped path saves h and the activation
    too); the backward recomputes the SwiGLU per block from h. Weight gradients accumulate
    over an expert's blocks in place (first block writes, the rest add).
    """

    @staticmethod
    def forward(ctx, x_NH, probs_N, w1_EHF2, w2_EFH, counts: Sequence[int], rows: int, save: bool):
        num_rows, hidden = x_NH.shape
        ffn = w2_EFH.shape[1]
        out_NH = x_NH.new_empty(num_rows, hidden)
        h_NF2 = x_NH.new_empty(num_rows if save else _widest_block(counts, rows), 2 * ffn)
        start = 0
        for expert, count in enumerate(counts):
            for lo, hi in _blocks(start, count, rows):
                n = hi - lo
                h_nF2 = h_NF2[lo:hi] if save else h_NF2[:n]
                torch.mm(x_NH[lo:hi], w1_EHF2[expert], out=h_nF2)
                a_nF, b_nF = h_nF2.chunk(2, dim=-1)
                act_nF = torch.nn.functional.silu(a_nF)
                act_nF.mul_(b_nF).mul_(probs_N[lo:hi].unsqueeze(-1))
                torch.mm(act_nF, w2_EFH[expert], out=out_NH[lo:hi])
            start += count
        if save:
            ctx.save_for_backward(x_NH, probs_N, w1_EHF2, w2_EFH, h_NF2)
        ctx.counts, ctx.rows = counts, rows
        return out_NH

    @staticmethod
    def backward(ctx, grad_NH):
        x_NH, probs_N, w1_EHF2, w2_EFH, h_NF2 = ctx.saved_tensors
        counts, rows = ctx.counts, ctx.rows
        need_x, need_p, need_w1, need_w2 = ctx.needs_input_grad[:4]
        grad_NH = grad_NH.contiguous()
        ffn = w2_EFH.shape[1]
        grad_x = torch.empty_like(x_NH) if need_x else None
        grad_p = torch.empty_like(probs_N) if need_p else None
        grad_w1 = torch.empty_like(w1_EHF2) if need_w1 else None
        grad_w2 = torch.empty_like(w2_EFH) if need_w2 else None
        block = max(1, _widest_block(counts, rows))
        # Scratch reused by every block: the d(act), sigmoid, silu and d(h) of one block.
        grad_act_BF, sig_BF, silu_BF = (x_NH.new_empty(block, ffn) for _ in range(3))
        grad_h_BF2 = x_NH.new_empty(block, 2 * ffn)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                for grad_w in (grad_w1, grad_w2):
                    if grad_w is not None:
                        grad_w[expert].zero_()
                continue
            for lo, hi in _blocks(start, count, rows):
                n, first = hi - lo, lo == start
                grad_out_nH = grad_NH[lo:hi]
                p_n1 = probs_N[lo:hi].unsqueeze(-1)
                a_nF, b_nF = h_NF2[lo:hi].chunk(2, dim=-1)
                grad_act = torch.mm(grad_out_nH, w2_EFH[expert].t(), out=grad_act_BF[:n])
                sig = torch.sigmoid(a_nF, out=sig_BF[:n])
                silu = torch.mul(a_nF, sig, out=silu_BF[:n])
                grad_a, grad_b = grad_h_BF2[:n].chunk(2, dim=-1)
                # grad_a's slot holds the unweighted activation silu(a) * b while it is needed.
                unweighted = torch.mul(silu, b_nF, out=grad_a)
                if grad_p is not None:
                    torch.linalg.vecdot(grad_act, unweighted, out=grad_p[lo:hi])
                if grad_w2 is not None:
                    weighted = unweighted.mul_(p_n1)
                    if first:
                        torch.mm(weighted.t(), grad_out_nH, out=grad_w2[expert])
                    else:
                        grad_w2[expert].addmm_(weighted.t(), grad_out_nH)
                torch.mul(grad_act, silu, out=grad_b).mul_(p_n1)
                # d silu(a) / da = sig + silu (1 - sig), built in silu's buffer.
                dsilu = silu.addcmul_(silu, sig, value=-1).add_(sig)
                torch.mul(grad_act, b_nF, out=grad_a).mul_(dsilu).mul_(p_n1)
                grad_h = grad_h_BF2[:n]
                if grad_w1 is not None:
                    if first:
                        torch.mm(x_NH[lo:hi].t(), grad_h, out=grad_w1[expert])
                    else:
                        grad_w1[expert].addmm_(x_NH[lo:hi].t(), grad_h)
                if grad_x is not None:
                    torch.mm(grad_h, w1_EHF2[expert].t(), out=grad_x[lo:hi])
            start += count
        return grad_x, grad_p, grad_w1, grad_w2, None, None, None


def blocked_swiglu_experts(x_NH: torch.Tensor, probs_N: torch.Tensor, w1_EHF2: torch.Tensor,
                           w2_EFH: torch.Tensor, counts: Sequence[int], rows: Optional[int] = None) -> torch.Tensor:
    """The "blocked" path: per expert, weighted SwiGLU FFN in row blocks (see the module docstring)."""
    if rows is None:
        rows = block_rows(w1_EHF2.shape[2], x_NH.element_size())
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_NH, probs_N, w1_EHF2, w2_EFH))
    return _BlockedSwiGLUExperts.apply(x_NH.contiguous(), probs_N.to(x_NH.dtype).contiguous(),
                                       w1_EHF2, w2_EFH, list(counts), rows, save)


# ----------------------------------------------------------------------------------------------
_CHOICES: dict = {}
# auto's last logged path per shape without its row bucket: a run's routing moves its row
# counts across many buckets (early, unbalanced routing gives a rank a few rows per expert), and
# one INFO line per bucket said nothing new; the rule's path changes at most once per shape.
_RULE_LOGGED: dict = {}


def clear_cache() -> None:
    """Forgets every measured choice (tests; a process that changes threads mid-run)."""
    _CHOICES.clear()
    _RULE_LOGGED.clear()


def cached_choices() -> dict:
    """{(auto or measure, shape key): (path, {path: seconds, measure only})} of this process."""
    return dict(_CHOICES)


def shape_key(x_NH: torch.Tensor, w1_EHF2: torch.Tensor, w2_EFH: torch.Tensor, gated: bool, grad: bool) -> tuple:
    rows_bucket = x_NH.shape[0].bit_length() - 1  # floor(log2 rows); -1 for no rows
    return (x_NH.device.type, str(x_NH.dtype).removeprefix("torch."), w1_EHF2.shape[0], w1_EHF2.shape[1],
            w2_EFH.shape[1], gated, grad, rows_bucket, torch.get_num_threads())


def available_paths(x_NH: torch.Tensor, w1_EHF2: torch.Tensor, *, swiglu: bool, has_bias: bool,
                    grouped_ok: bool) -> list[str]:
    paths = ["loop"]
    if grouped_ok:
        paths.insert(0, "grouped_mm")
    if swiglu and not has_bias and x_NH.dtype in _BLOCKED_DTYPES and w1_EHF2.dtype == x_NH.dtype:
        paths.append("blocked")
    return paths


def rule_path(key: tuple, candidates: list[str]) -> str:
    """auto's choice for a CPU shape key: blocked from BLOCKED_MIN_ROWS_PER_EXPERT rows per expert
    (the bucket's lower end, so one key has one answer), else the first candidate."""
    num_experts, bucket = key[2], key[7]
    if "blocked" in candidates and bucket >= 0 and 2 ** bucket >= BLOCKED_MIN_ROWS_PER_EXPERT * num_experts:
        return "blocked"
    return candidates[0]


def choose_path(requested: str, key: tuple, candidates: list[str],
                time_path: Optional[Callable[[str], float]]) -> str:
    """The path to run: `requested` if it names a path (and it can run), else auto's rule or, with
    "measure", the fastest timed; cached per key and logged once.

    time_path(path) -> seconds of one forward (+ backward) on this shape; called only on the
    first use of `key` with requested == "measure"."""
    if requested not in ("auto", "measure"):
        if requested not in candidates:
            raise ValueError(f"expert_path={requested!r} cannot run this layer (available here: "
                             f"{', '.join(candidates)}): 'blocked' needs SwiGLU experts without biases in "
                             f"fp32/fp64 on CPU, 'grouped_mm' 16-byte row strides; use expert_path=auto")
        return requested
    if len(candidates) == 1:
        return candidates[0]
    cached = _CHOICES.get((requested, key))
    if cached is not None:
        return cached[0]
    times = {}
    if requested == "measure":
        times = {path: time_path(path) for path in candidates}
        best = min(times, key=times.get)
        # The first candidate (grouped_mm, else loop) is kept unless another is clearly faster.
        if times[best] > times[candidates[0]] * (1 - SWITCH_MARGIN):
            best = candidates[0]
        why = ", ".join(f"{p} {t * 1e3:.2f} ms" for p, t in sorted(times.items(), key=lambda kv: kv[1]))
    else:
        best = rule_path(key, candidates)
        why = f"rule: blocked from {BLOCKED_MIN_ROWS_PER_EXPERT} rows per expert; candidates {', '.join(candidates)}"
    _CHOICES[(requested, key)] = (best, times)
    level = logging.INFO
    if requested == "auto":
        family = key[:7] + key[8:]
        level = logging.INFO if _RULE_LOGGED.get(family) != best else logging.DEBUG
        _RULE_LOGGED[family] = best
    device, dtype, experts, hidden, ffn_x, gated, grad, bucket, threads = key
    log.log(level, "expert path for %d experts, H %d, F %d, %s, %s rows, %s, %d threads: %s (%s)",
            experts, hidden, ffn_x, dtype, f"{2 ** bucket}-{2 ** (bucket + 1) - 1}" if bucket >= 0 else "0",
            "forward + backward" if grad else "forward", threads, best, why)
    return best


def time_candidate(run: Callable[[], None], repeats: int = _TIMING_REPEATS) -> float:
    """Median-free minimum of `repeats` timed calls after one warm-up: the least disturbed sample."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
