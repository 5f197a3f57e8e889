"""Benchmark: every GroupedExperts compute path over a grid of shapes, and what auto's rule loses.

    OMP_NUM_THREADS=1 python tools/bench_expert_paths.py --json /tmp/expert_paths.json
    OMP_NUM_THREADS=1 python tools/bench_expert_paths.py --quick       # two small shapes (smoke)

Per shape (experts E x mean rows per expert; rows drawn uniformly over the experts, fp32,
hidden 256, expert FFN 512, SwiGLU, gates applied inside as in the layer) the experts alone,
forward + backward from fresh leaves, for each path that can run: grouped_mm, loop, blocked.
The paths run interleaved (A, B, C, A, B, C, ...) after a warm-up; the median of --repeats.
Per row: each path's ms, the fastest path, auto's choice (anyexperts/moe/expert_paths.py
rule_path) and rule_over_best = time(auto's choice) / time(fastest): the rule holds where it is
1.0 or within the noise. One process, as many BLAS threads as OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatcher import print_columns  # noqa: E402

PATHS = ("grouped_mm", "loop", "blocked")


def experts_module(num_experts: int, hidden: int, ffn: int, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anyexperts.moe.experts import GroupedExperts

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, num_moe_experts=num_experts,
                               ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False,
                               use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype)
    return GroupedExperts(num_experts, config)


def bench_shape(num_experts: int, rows_per_expert: int, opts: dict) -> dict:
    gen = torch.Generator().manual_seed(opts["seed"] + num_experts * rows_per_expert)
    num_rows = num_experts * rows_per_expert
    counts = torch.bincount(torch.randint(0, num_experts, (num_rows,), generator=gen), minlength=num_experts)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts["dtype"]]
    experts = experts_module(num_experts, opts["hidden"], opts["ffn"], dtype)
    device = experts.fc1_weight.device
    x_NH = torch.randn(num_rows, opts["hidden"], generator=gen).to(device, dtype)
    p_N = torch.rand(num_rows, generator=gen).to(device, dtype)
    grad_NH = torch.randn(num_rows, opts["hidden"], generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(path):
        def run():
            experts.expert_path = path
            for param in experts.parameters():
                param.grad = None
            x, p = x_NH.clone().requires_grad_(True), p_N.clone().requires_grad_(True)
            out, _ = experts(x, counts, p)
            out.backward(grad_NH)
        return run

    # What auto runs here, as GroupedExperts decides it (the CPU rule, or grouped_mm on a GPU).
    step("auto")()
    auto = experts.last_path
    paths = [path for path in PATHS if path in experts.candidate_paths(x_NH)]
    steps = {path: step(path) for path in paths}
    for run in steps.values():
        run()
    samples = {path: [] for path in paths}
    for _ in range(opts["repeats"]):
        for path, run in steps.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            samples[path].append(time.perf_counter() - start)
    ms = {path: statistics.median(values) * 1e3 for path, values in samples.items()}
    best = min(ms, key=ms.get)
    row = dict(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               dtype=opts["dtype"], num_experts=num_experts, rows_per_expert=rows_per_expert, num_rows=num_rows,
               **{f"{path}_ms": round(ms[path], 3) if path in ms else None for path in PATHS},
               best=best, auto=auto, rule_over_best=round(ms[auto] / ms[best], 4),
               blocked_over_grouped_mm=(round(ms["blocked"] / ms["grouped_mm"], 4)
                                        if "blocked" in ms and "grouped_mm" in ms else None))
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64, 128])
    parser.add_argument("--rows-per-expert", type=int, nargs="+", default=[8, 32, 64, 128, 256, 1024])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 is the GPU setting (grouped_mm's CUDA kernel); blocked runs fp32 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="E 4 x rows 8 and 64, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.rows_per_expert, args.repeats, args.hidden, args.ffn = [4], [8, 64], 2, 32, 64
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from anyexperts.training import host_memory

    host_memory.keep_freed_memory()  # as the trainer does (trainer.keep_freed_memory); every variant alike
    opts = vars(args)
    rows = [bench_shape(e, r, opts) for e in args.experts for r in args.rows_per_expert]
    print_columns(rows, ["device", "dtype", "num_experts", "rows_per_expert", "num_rows", *(f"{p}_ms" for p in PATHS),
                         "best", "auto", "rule_over_best", "blocked_over_grouped_mm"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
