"""Benchmark: least-loaded expert parallelism (rebalancing) against plain expert parallelism.

    OMP_NUM_THREADS=1 python tools/bench_balancer.py --json /tmp/balancer.json          # EP=4 and EP=2
    OMP_NUM_THREADS=1 python tools/bench_balancer.py --ep-sizes 2 --tokens 512 --repeats 3

Per EP size (one spawn of that many gloo ranks, tests/distributed.py, one BLAS thread each) and
case, every rank routes its tokens to top-k distinct experts drawn by a popularity: Zipf with
exponent s (p_e ~ 1 / rank_e^s) for the zipf cases, uniform for `balanced`. With the default
`--layout sorted` the most popular experts are the lowest ids, so rank 0 holds the hottest
ones (the case rebalancing is for); `shuffled` permutes the popularity over the experts.
Timed: forward + backward of dispatch + GroupedExperts + combine (the routed part of the MoE
layer, router excluded), plain (VariableSlotAllToAll without a plan) and rebalanced
(RebalanceConfig(enable=True, threshold, cap_factor, min_chunk)), interleaved after a warm-up;
each measurement is the slowest rank's time, the median is reported. Wall time and process CPU
time (max over ranks: the critical path of the work) are both given; on a shared machine the
CPU-time ratio is the steadier one.

Columns: rank_load_imbalance_before / _after (max / mean slots computed per rank),
max_rank_slots_before / _after (the critical-path work in slots), layer_ms_plain /
layer_ms_rebalanced (wall), cpu_ms_plain / cpu_ms_rebalanced, speedup (plain / rebalanced wall),
weight_bytes_moved (expert weights sent forward by all ranks; their gradients return the same
amount in backward), slots_moved (slots computed away from their expert's home rank),
plan_ms (host time of plan_rebalance, rank 0, median), active (whether the plan moved anything).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.distributed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatcher import print_columns, time_interleaved  # noqa: E402


def zipf_routing(num_tokens: int, num_experts: int, topk: int, zipf_s: float, seed: int, *, shuffled: bool):
    """(expert_TK, gate_TK): top-k distinct experts per token, sampled without replacement by
    popularity (Gumbel top-k of log p); softmax gates over random logits."""
    gen = torch.Generator().manual_seed(seed)
    log_p_E = -zipf_s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
    if shuffled:
        log_p_E = log_p_E[torch.randperm(num_experts, generator=torch.Generator().manual_seed(0))]
    gumbel_TE = -torch.log(-torch.log(torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64)))
    expert_TK = (log_p_E + gumbel_TE).topk(topk, dim=1).indices
    gate_TK = torch.softmax(torch.randn(num_tokens, topk, generator=gen), dim=1)
    return expert_TK, gate_TK


def _experts(num_local: int, num_experts: int, ep_size: int, hidden: int, ffn: int, seed: int):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.experts import GroupedExperts

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, num_moe_experts=num_experts,
                               ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                               params_dtype=torch.float32, expert_model_parallel_size=ep_size)
    torch.manual_seed(seed)
    return GroupedExperts(num_local, config)


def _step_fn(dispatcher, experts, hidden_TH, expert_TK, gate_TK, grad_TH):
    params = experts.expert_weights()

    def step():
        for param in params:
            param.grad = None
        h = hidden_TH.clone().requires_grad_(True)
        gates = gate_TK.clone().requires_grad_(True)
        tokens_NH, counts, probs_N = dispatcher.dispatch(h, expert_TK, gates)
        plan = dispatcher.last_plan
        if plan is not None and plan.active:
            out_NH, _ = experts.forward_with_borrowed(tokens_NH, counts, probs_N,
                                                      dispatcher.borrow_weights(params))
        else:
            out_NH, _ = experts(tokens_NH, counts, probs_N)
        dispatcher.combine(out_NH).backward(grad_TH)

    return step


def bench(rank: int, world_size: int, opts: dict) -> list:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from anyexperts.moe.dispatcher import VariableSlotAllToAll
    from anyexperts.moe.rebalance import RebalanceConfig, plan_rebalance

    group = parallel_state.get_expert_model_parallel_group()
    num_experts, topk, tokens = opts["experts"], opts["topk"], opts["tokens"]
    experts = _experts(num_experts // world_size, num_experts, world_size, opts["hidden"], opts["ffn"], seed=rank)
    rebalance = RebalanceConfig(enable=True, threshold=opts["threshold"], cap_factor=opts["cap_factor"],
                                min_chunk=opts["min_chunk"])
    cases = [(f"zipf_s{s:g}", s) for s in opts["zipf_s"]] + [("balanced", 0.0)]
    rows = []
    for case, zipf_s in cases:
        expert_TK, gate_TK = zipf_routing(tokens, num_experts, topk, zipf_s, seed=1000 + rank,
                                          shuffled=opts["layout"] == "shuffled")
        gen = torch.Generator().manual_seed(rank)
        hidden_TH = torch.randn(tokens, opts["hidden"], generator=gen)
        grad_TH = torch.randn(tokens, opts["hidden"], generator=gen)
        plain = VariableSlotAllToAll(num_experts=num_experts, ep_group=group)
        balanced = VariableSlotAllToAll(num_experts=num_experts, ep_group=group, rebalance=rebalance)
        steps = {"plain": _step_fn(plain, experts, hidden_TH, expert_TK, gate_TK, grad_TH),
                 "rebalanced": _step_fn(balanced, experts, hidden_TH, expert_TK, gate_TK, grad_TH)}
        times = time_interleaved(steps, opts["repeats"], group)
        plan = balanced.last_plan
        weight_bytes = torch.tensor([balanced.last_weight_bytes_sent], dtype=torch.float64)
        dist.all_reduce(weight_bytes, group=group)
        # The planner's host time alone, on the counts this step gathered.
        counts_RE = torch.stack([torch.bincount(expert_TK.reshape(-1), minlength=num_experts)])
        gathered = [torch.empty_like(counts_RE) for _ in range(world_size)]
        dist.all_gather(gathered, counts_RE, group=group)
        counts_RE = torch.cat(gathered)
        plan_s = []
        for _ in range(20):
            start = time.perf_counter()
            plan_rebalance(counts_RE, rebalance)
            plan_s.append(time.perf_counter() - start)
        rows.append(dict(
            case=case, ep_size=world_size, zipf_s=zipf_s, layout=opts["layout"], num_tokens=tokens,
            num_experts=num_experts, topk=topk, hidden=opts["hidden"], ffn=opts["ffn"],
            threshold=rebalance.threshold, cap_factor=rebalance.cap_factor, min_chunk=rebalance.min_chunk,
            active=plan.active,
            rank_load_imbalance_before=round(plan.imbalance_before, 3),
            rank_load_imbalance_after=round(plan.imbalance_after, 3),
            max_rank_slots_before=int(plan.load_before_R.max()), max_rank_slots_after=int(plan.load_after_R.max()),
            layer_ms_plain=round(times["plain"][0] * 1e3, 2), layer_ms_rebalanced=round(times["rebalanced"][0] * 1e3, 2),
            cpu_ms_plain=round(times["plain"][1] * 1e3, 2), cpu_ms_rebalanced=round(times["rebalanced"][1] * 1e3, 2),
            speedup=round(times["plain"][0] / times["rebalanced"][0], 3),
            weight_bytes_moved=int(weight_bytes), slots_moved=plan.num_moved_slots,
            plan_ms=round(statistics.median(plan_s) * 1e3, 3)))
    return rows


COLUMNS = ["case", "ep_size", "zipf_s", "active", "rank_load_imbalance_before", "rank_load_imbalance_after",
           "max_rank_slots_before", "max_rank_slots_after", "layer_ms_plain", "layer_ms_rebalanced", "speedup",
           "cpu_ms_plain", "cpu_ms_rebalanced", "weight_bytes_moved", "slots_moved", "plan_ms"]


def print_table(rows: list) -> None:
    print_columns(rows, COLUMNS)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[4, 2], choices=(2, 4),
                        help="one spawn of that many gloo ranks each")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--zipf-s", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--layout", choices=("sorted", "shuffled"), default="sorted")
    parser.add_argument("--threshold", type=float, default=1.3)
    parser.add_argument("--cap-factor", type=float, default=1.0)
    parser.add_argument("--min-chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    from tests.distributed import run_distributed

    opts = {k: v for k, v in vars(args).items() if k not in ("json", "ep_sizes")}
    rows = []
    for ep_size in args.ep_sizes:
        rows += run_distributed(bench, ep_size, args=(opts,), expert_parallel_size=ep_size, timeout=3600.0)[0]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
