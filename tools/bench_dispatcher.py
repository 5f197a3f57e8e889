"""Benchmark: VariableSlotAllToAll + GroupedExperts against megatron's alltoall dispatcher + SequentialMLP.

    OMP_NUM_THREADS=1 python tools/bench_dispatcher.py --json /tmp/bench.json              # EP=1, default sweep
    OMP_NUM_THREADS=1 python tools/bench_dispatcher.py --world-size 2 --json /tmp/bench2.json  # 2 gloo ranks, EP=2
    OMP_NUM_THREADS=1 python tools/bench_dispatcher.py --full-sweep --cases sweep  # 1k..32k tokens x 8..128 experts

Every rank is a process spawned by the project's harness (tests/distributed.py), one BLAS
thread each. Times are forward + backward of the routed part of an MoE layer on a given
routing (router excluded): ours = dispatch + GroupedExperts + combine; megatron =
dispatch_preprocess .. combine_postprocess of MoEAlltoAllTokenDispatcher + SequentialMLP, with
the same weights. Within a case the variants run interleaved (A, B, A, B, ...) after a warm-up,
each measurement is the slowest rank's time, and the median is reported; compare ratios
within one run, not absolute times between runs. Wall time (ours_ms, megatron_ms, ratio) and
process CPU time (ours_cpu_ms, megatron_cpu_ms, cpu_ratio; all threads, gloo's included) are
both reported: on a shared machine the CPU-time ratio is the steadier one.

Cases:
  fixed_topk       same routing map for both (every token k real experts): ours/megatron.
  variable         K_max = k slots, mean r real per token (rest -1): ours(r)/ours(k) vs r/k.
  kmax_memory      4 real slots per token placed among K_max in {4,8,16,32} slots: peak memory.
  sweep            fixed top-k over tokens per rank x experts.
bytes_sent: hidden-state bytes all ranks sent to other ranks in one forward (dispatch and
combine); bytes_expected: 2 x (real slots routed to another rank) x hidden x element size.
floor_ms (fixed_topk and sweep rows): the per-expert FFN math alone on the rows each rank's
experts receive (fc1 -> activation -> fc2 per expert on ready leaves, forward + backward; no
dispatch, permutation or combine), the slowest rank's, interleaved with the two; ours_over_floor,
megatron_over_floor, and ours_over_floor_for_target = 0.95 x megatron_over_floor (the ours / floor
that ratio <= 0.95 demands).
peak_mem_bytes: torch profiler (profile_memory=True), peak of the cumulative CPU allocator
bytes during one forward + backward, relative to its start (inputs and weights excluded; the
weight grads included), rank 0, minimum over 5 steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.distributed


def make_routing(num_tokens: int, num_experts: int, max_slots: int, mean_real: float, seed: int,
                 *, exact_real: bool = False):
    """Router-like routing: top-K_max of random logits, then the lowest-ranked slots of each token
    made non-real so that it keeps 1 + Binomial(K_max - 1, p) real slots (mean `mean_real`), or
    exactly `mean_real` real slots at random positions when exact_real."""
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
    num_real_slots = min(max_slots, num_experts)
    top_vals, top_ids = logits_TE.topk(num_real_slots, dim=1)
    gate_TK = torch.softmax(top_vals, dim=1)
    expert_TK = torch.full((num_tokens, max_slots), -1, dtype=torch.int64)
    gates_TK = torch.zeros(num_tokens, max_slots)
    if exact_real:
        real = int(mean_real)
        slot_TK = torch.rand(num_tokens, max_slots, generator=gen).argsort(1)[:, :real]
        expert_TK.scatter_(1, slot_TK, top_ids[:, :real])
        gates_TK.scatter_(1, slot_TK, gate_TK[:, :real])
        return expert_TK, gates_TK
    expert_TK[:, :num_real_slots] = top_ids
    gates_TK[:, :num_real_slots] = gate_TK
    if mean_real < max_slots:
        p = (mean_real - 1) / (max_slots - 1)
        trials_T = torch.full((num_tokens,), float(max_slots - 1))
        real_T = 1 + torch.binomial(trials_T, torch.full_like(trials_T, p), generator=gen).long()
        drop_TK = torch.arange(max_slots).unsqueeze(0) >= real_T.unsqueeze(1)
        expert_TK[drop_TK] = -1
        gates_TK[drop_TK] = 0
    return expert_TK, gates_TK


class Layer:
    """Both implementations of the routed part of one MoE layer, with identical weights."""

    def __init__(self, *, num_experts, hidden, ffn, topk, dtype):
        import torch.nn.functional as F
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
        from megatron.core.transformer.transformer_config import TransformerConfig

        from anyexperts.moe.dispatcher import VariableSlotAllToAll
        from anyexperts.moe.experts import GroupedExperts

        ep_size = parallel_state.get_expert_model_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        self.num_experts, self.hidden, self.dtype = num_experts, hidden, dtype
        local = num_experts // ep_size
        config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, num_moe_experts=num_experts,
                                   ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
                                   activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                                   params_dtype=dtype, expert_model_parallel_size=ep_size, moe_router_topk=topk,
                                   moe_token_dispatcher_type="alltoall")
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        self.seq_mlp = SequentialMLP(local, config, submodules, pg_collection=pgs)
        self.megatron_dispatcher = MoEAlltoAllTokenDispatcher(
            local, list(range(ep_rank * local, (ep_rank + 1) * local)), config=config, pg_collection=pgs)
        self.experts = GroupedExperts(local, config, pg_collection=pgs).load_from_sequential_mlp(self.seq_mlp)
        self.dispatcher = VariableSlotAllToAll(num_experts=num_experts, ep_group=pgs.ep)
        self.ep_group, self.ep_size, self.ep_rank, self.local = pgs.ep, ep_size, ep_rank, local
        self.config = config

    def ours(self, hidden_TH, expert_TK, gate_TK):
        tokens_NH, counts, probs_N = self.dispatcher.dispatch(hidden_TH, expert_TK, gate_TK)
        out_NH, _ = self.experts(tokens_NH, counts, probs_N)
        return self.dispatcher.combine(out_NH)

    def megatron(self, hidden_TH, routing_map_TE, probs_TE):
        d = self.megatron_dispatcher
        x, p = d.dispatch_preprocess(hidden_TH, routing_map_TE, probs_TE)
        x, p = d.token_dispatch(x, p)
        x, counts, p = d.dispatch_postprocess(x, p)
        out, _ = self.seq_mlp(x, counts, p)
        return d.combine_postprocess(d.token_combine(d.combine_preprocess(out)))


def _step_fn(layer: Layer, which: str, expert_TK, gate_TK, seed: int):
    """A closure running one forward + backward from fresh leaves (the routing is its input)."""
    from anyexperts.moe.dispatcher import routing_to_dense

    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(expert_TK.shape[0], layer.hidden, generator=gen, dtype=layer.dtype)
    grad_TH = torch.randn(hidden_TH.shape, generator=gen, dtype=layer.dtype)
    if which == "ours":
        args = (expert_TK, gate_TK.to(layer.dtype))
        fn, params = layer.ours, list(layer.experts.parameters())
    else:
        probs_TE, routing_map_TE = routing_to_dense(expert_TK, gate_TK.to(layer.dtype), layer.num_experts)
        args = (routing_map_TE, probs_TE)
        fn, params = layer.megatron, list(layer.seq_mlp.parameters())

    def clear_grads():
        for param in params:
            param.grad = None

    def step():
        clear_grads()
        h = hidden_TH.clone().requires_grad_(True)
        gates = args[1].clone().requires_grad_(True)
        fn(h, args[0], gates).backward(grad_TH)

    step.clear_grads = clear_grads
    return step


def floor_step(seq_mlp, config, counts: list, seed: int):
    """The per-expert FFN math alone: for each expert with n > 0 routed rows, fc1 -> activation
    -> fc2 on a ready [n, H] leaf, then one backward over all of them. No routing, permute,
    gate, cat or combine: the work any implementation of the layer has to do."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    dtype = seq_mlp.local_experts[0].linear_fc1.weight.dtype
    hidden = seq_mlp.local_experts[0].linear_fc1.weight.shape[1]
    work = []  # (fc1 [2F or F, H], fc2 [H, F], x_nH leaf, grad_nH)
    for expert, n in enumerate(counts):
        if n:
            mlp = seq_mlp.local_experts[expert]
            device = mlp.linear_fc1.weight.device
            x_nH = torch.randn(n, hidden, generator=gen).to(device, dtype).requires_grad_(True)
            work.append((mlp.linear_fc1.weight, mlp.linear_fc2.weight, x_nH,
                         torch.randn(n, hidden, generator=gen).to(device, dtype)))
    leaves = [t for fc1, fc2, x, _ in work for t in (fc1, fc2, x)]

    def step():
        for leaf in leaves:
            leaf.grad = None
        outs = []
        for fc1, fc2, x_nH, _ in work:
            a_nF = F.linear(x_nH, fc1)
            if config.gated_linear_unit:
                gate_nF, linear_nF = a_nF.chunk(2, dim=-1)
                a_nF = config.activation_func(gate_nF) * linear_nF
            else:
                a_nF = config.activation_func(a_nF)
            outs.append(F.linear(a_nF, fc2))
        torch.autograd.backward(outs, [g for *_, g in work])

    return step


@torch.no_grad()
def received_counts(layer: Layer, expert_TK, gate_TK) -> list:
    """Rows each local expert of this rank receives under a routing (one dispatch of zeros)."""
    hidden_TH = torch.zeros(expert_TK.shape[0], layer.hidden, dtype=layer.dtype)
    _, counts, _ = layer.dispatcher.dispatch(hidden_TH, expert_TK, gate_TK.to(layer.dtype))
    return [int(c) for c in counts]


def _timed(step, group) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one step; max over ranks."""
    import torch.distributed as dist

    dist.barrier(group=group)
    if torch.cuda.is_available():  # a CUDA step has only queued its kernels when it returns
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    return float(elapsed[0]), float(elapsed[1])


# Warm-up rounds at most, until a round of every step page-faults no more (warm_up below).
MAX_WARM_UP_ROUNDS = 6


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(steps: dict, group, max_rounds: int = MAX_WARM_UP_ROUNDS) -> int:
    """Runs every step, round after round, until one round page-faults no new memory on any rank
    (at most max_rounds); returns the rounds run.

    With glibc keeping freed memory (host_memory.keep_freed_memory, as the trainer does) the
    heap grows to the high-water mark of the variants' interleaved allocations and then stays;
    until it has, a step that finds no free chunk large enough extends the heap and pays the
    page faults (measured: 42,000 faults, +25% of one 16k-token step of one variant, in a
    process that had run smaller cases first). A training run reaches that steady state in its
    first steps; the timed rounds should too."""
    import torch.distributed as dist

    for round_index in range(1, max_rounds + 1):
        faults = _minor_faults()
        for step in steps.values():
            step()
        new_faults = torch.tensor([_minor_faults() - faults], dtype=torch.int64)
        dist.all_reduce(new_faults, op=dist.ReduceOp.MAX, group=group)  # every rank stops together
        # A step's own few faults are the interpreter's; a heap extension is thousands (one per
        # 4 KiB page).
        if int(new_faults) < 64 * len(steps):
            return round_index
    return max_rounds


def time_interleaved(steps: dict, repeats: int, group) -> dict:
    """Median (wall, CPU) seconds per step of each named step, run A, B, A, B, ... after a warm-up
    (warm_up: until the heap has stopped growing).

    CPU time is reported beside wall time because the machine is shared: a process that is
    descheduled loses wall time but not CPU time, so CPU-time ratios are the steadier ones.
    """
    warm_up(steps, group)
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(_timed(step, group))
    return {name: tuple(statistics.median(v[i] for v in values) for i in range(2))
            for name, values in samples.items()}


def peak_memory(step, tries: int = 5) -> int:
    """Peak of the cumulative CPU allocator bytes during one step (torch profiler memory events).

    The minimum over `tries` steps: at EP > 1 a step sometimes reads ~one [N, H] buffer higher,
    because the last reference to an all_to_all send buffer was dropped on gloo's worker thread,
    whose free the profiler does not record; the minimum skips those artefacts.
    """
    from torch.profiler import ProfilerActivity, profile

    peaks = []
    for _ in range(tries):
        # Frees of blocks allocated before the window would count as negative: drop the old
        # weight grads first, so the window sees every allocation it frees.
        step.clear_grads()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        peaks.append(max(itertools.accumulate((e.nbytes() for e in events), initial=0)))
    return min(peaks)


def _bytes(layer: Layer, expert_TK, element_size: int) -> tuple[int, int]:
    """(bytes our dispatcher reported, bytes the routing implies), summed over the EP group."""
    import torch.distributed as dist

    real = expert_TK[expert_TK >= 0]
    remote = int((real // layer.local != layer.ep_rank).sum())
    totals = torch.tensor([layer.dispatcher.last_bytes_sent, 2 * remote * layer.hidden * element_size],
                          dtype=torch.int64)
    dist.all_reduce(totals, group=layer.ep_group)
    return int(totals[0]), int(totals[1])


def _record(case, layer, num_tokens, expert_TK, ours_t, megatron_t, peak, megatron_peak=None, floor_t=None,
            **extra):
    """One result row; ours_t / megatron_t / floor_t are (wall, cpu) seconds or None."""
    sent, expected = _bytes(layer, expert_TK, torch.tensor([], dtype=layer.dtype).element_size())
    ms = lambda t, i: None if t is None else round(t[i] * 1e3, 3)  # noqa: E731
    row = dict(case=case, num_tokens=num_tokens, num_experts=layer.num_experts, ep_size=layer.ep_size,
               max_slots=expert_TK.shape[1], mean_real_slots=round(float((expert_TK >= 0).sum(1).float().mean()), 4),
               ours_ms=ms(ours_t, 0), megatron_ms=ms(megatron_t, 0),
               ratio=None if megatron_t is None else round(ours_t[0] / megatron_t[0], 4),
               ours_cpu_ms=ms(ours_t, 1), megatron_cpu_ms=ms(megatron_t, 1),
               cpu_ratio=None if megatron_t is None else round(ours_t[1] / megatron_t[1], 4),
               bytes_sent=sent, bytes_expected=expected, peak_mem_bytes=peak, megatron_peak_mem_bytes=megatron_peak)
    if floor_t is not None:
        row.update(floor_ms=ms(floor_t, 0), ours_over_floor=round(ours_t[0] / floor_t[0], 4),
                   megatron_over_floor=round(megatron_t[0] / floor_t[0], 4),
                   # ours / floor that ratio <= 0.95 demands; below 1: faster than the expert math alone.
                   ours_over_floor_for_target=round(0.95 * megatron_t[0] / floor_t[0], 4))
    row.update(extra)
    return row


def bench(rank: int, world_size: int, opts: dict) -> list:
    torch.manual_seed(0)
    from anyexperts.training import host_memory

    host_memory.keep_freed_memory()  # as the trainer does (trainer.keep_freed_memory); every variant alike
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts["dtype"]]
    group = None
    rows = []
    tokens, experts, topk, repeats = opts["tokens"], opts["experts"], opts["topk"], opts["repeats"]
    seed = 100 * rank

    def layer_for(num_experts):
        return Layer(num_experts=num_experts, hidden=opts["hidden"], ffn=opts["ffn"], topk=topk, dtype=dtype)

    layer = layer_for(experts)
    group = layer.ep_group
    if "main" in opts["cases"]:
        # (1) + (2): fixed top-k and variable slots, all four variants interleaved in one group.
        fixed = make_routing(tokens, experts, topk, topk, seed)
        steps = {"ours_fixed": _step_fn(layer, "ours", *fixed, seed),
                 "megatron_fixed": _step_fn(layer, "megatron", *fixed, seed),
                 "floor_fixed": floor_step(layer.seq_mlp, layer.config, received_counts(layer, *fixed), seed)}
        variable = {r: make_routing(tokens, experts, topk, r, seed + 1) for r in opts["mean_real"]}
        for r, routing in variable.items():
            steps[f"ours_r{r}"] = _step_fn(layer, "ours", *routing, seed)
            steps[f"megatron_r{r}"] = _step_fn(layer, "megatron", *routing, seed)
        times = time_interleaved(steps, repeats, group)
        peak = peak_memory(steps["ours_fixed"])
        rows.append(_record("fixed_topk", layer, tokens, fixed[0], times["ours_fixed"], times["megatron_fixed"], peak,
                            peak_memory(steps["megatron_fixed"]), floor_t=times["floor_fixed"]))
        for r, routing in variable.items():
            peak = peak_memory(steps[f"ours_r{r}"])
            measured = [times[f"ours_r{r}"][i] / times["ours_fixed"][i] for i in range(2)]
            expected = float((routing[0] >= 0).sum()) / (tokens * topk)
            rows.append(_record("variable", layer, tokens, routing[0], times[f"ours_r{r}"], times[f"megatron_r{r}"],
                                peak,
                                time_vs_fixed=round(measured[0], 4), cpu_time_vs_fixed=round(measured[1], 4),
                                real_fraction=round(expected, 4), within_5pct=abs(measured[0] / expected - 1) <= 0.05,
                                cpu_within_5pct=abs(measured[1] / expected - 1) <= 0.05))

        # (3) peak memory against K_max at 4 real slots per token.
        kmax_steps = {}
        for max_slots in opts["kmax"]:
            routing = make_routing(tokens, experts, max_slots, 4, seed + 2, exact_real=True)
            kmax_steps[max_slots] = (routing, _step_fn(layer, "ours", *routing, seed))
        times = time_interleaved({k: s for k, (_, s) in kmax_steps.items()}, repeats, group)
        for max_slots, (routing, step) in kmax_steps.items():
            rows.append(_record("kmax_memory", layer, tokens, routing[0], times[max_slots], None, peak_memory(step)))

    # (4) sweep over tokens per rank and experts, fixed top-k.
    for num_experts in opts["sweep_experts"] if "sweep" in opts["cases"] else ():
        sweep_layer = layer if num_experts == experts else layer_for(num_experts)
        for num_tokens in opts["sweep_tokens"]:
            routing = make_routing(num_tokens, num_experts, topk, topk, seed + 3)
            pair = {"ours": _step_fn(sweep_layer, "ours", *routing, seed),
                    "megatron": _step_fn(sweep_layer, "megatron", *routing, seed),
                    "floor": floor_step(sweep_layer.seq_mlp, sweep_layer.config,
                                        received_counts(sweep_layer, *routing), seed)}
            times = time_interleaved(pair, repeats, group)
            rows.append(_record("sweep", sweep_layer, num_tokens, routing[0], times["ours"], times["megatron"],
                                peak_memory(pair["ours"]), peak_memory(pair["megatron"]), floor_t=times["floor"]))
    return rows


def print_table(rows: list) -> None:
    columns = ["case", "num_tokens", "num_experts", "ep_size", "max_slots", "mean_real_slots", "ours_ms",
               "megatron_ms", "ratio", "cpu_ratio", "bytes_sent", "bytes_expected", "peak_mem_bytes",
               "megatron_peak_mem_bytes"]
    extra = ["floor_ms", "ours_over_floor", "megatron_over_floor", "ours_over_floor_for_target", "time_vs_fixed",
             "cpu_time_vs_fixed", "real_fraction"]
    header = columns + extra
    print_columns(rows, header)


def print_columns(rows: list, header: list) -> None:
    """rows (dicts) as a left-aligned table of the `header` keys; a missing value prints empty."""
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in header] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    parser.add_argument("--world-size", type=int, default=1, choices=(1, 2, 4), help="gloo ranks = EP size")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4, help="k of the fixed routing and K_max of the variable one")
    parser.add_argument("--mean-real", type=float, nargs="+", default=[3.0, 2.0])
    parser.add_argument("--kmax", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--sweep-experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--cases", nargs="+", choices=("main", "sweep"), default=["main", "sweep"],
                        help="main: fixed_topk, variable and kmax_memory; sweep: the sweep")
    parser.add_argument("--full-sweep", action="store_true",
                        help="tokens 1k, 2k, 4k, 8k, 16k, 32k x experts 8, 16, 32, 64, 128 (long)")
    args = parser.parse_args(argv)
    if args.full_sweep:
        args.sweep_tokens = [1024, 2048, 4096, 8192, 16384, 32768]
        args.sweep_experts = [8, 16, 32, 64, 128]
    from tests.distributed import run_distributed

    opts = {k: v for k, v in vars(args).items() if k != "json"}
    rows = run_distributed(bench, args.world_size, args=(opts,), expert_parallel_size=args.world_size,
                           timeout=3600.0)[0]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
