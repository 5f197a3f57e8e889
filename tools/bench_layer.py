"""Benchmark: the whole AnyExperts MoE layer against megatron-core's MoELayer and the expert-math floor.

    OMP_NUM_THREADS=1 python tools/bench_layer.py --quick                           # one tiny case (smoke)
    OMP_NUM_THREADS=1 python tools/bench_layer.py --json /tmp/layer.json            # E 8, 16 x 1k tokens x k 2, 4
    OMP_NUM_THREADS=1 python tools/bench_layer.py --full --json /tmp/layer_full.json  # the grid below (long)

--full: experts {8, 16, 64, 128} x tokens {1024, 4096, 16384} x k {1, 2, 4, 8}. Everything
runs in one rank process (tests/distributed.py's harness, world of 1, EP = 1) with as many
BLAS threads as this process has (OMP_NUM_THREADS). Times are forward + backward of the
whole MoE layer (router included) on hidden states [T, 1, H] in training mode, as in a step the
trainer does not log (no routing statistics recorded). Per case
(E, T, k) these run interleaved (A, B, C, ..., A, B, C, ...) after one warm-up each, and the
median is reported, wall time and process CPU time (on a shared machine the CPU-time ratios
are the steadier ones; compare ratios within one run, not absolute times between runs):

  megatron             megatron-core MoELayer (top-k softmax router, aux losses off,
                       MoEAlltoAllTokenDispatcher, SequentialMLP).
  topk                 the project's top-k path, `moe=topk moe.grouped_gemm=true`
                       (anyexperts.model.layer_specs: megatron's MoELayer and router with the run
                       config's aux loss, the project's dispatcher and GroupedExperts,
                       moe/topk_layer.py; top-1 gates are pre-softmax).
  anyexperts_fixed_k   the AnyExperts layer at the reduction settings (k_min = k_max = k,
                       rho_max = 0, V = 0, alpha = 0, losses off), i.e. megatron's top-k MoELayer:
                       its forward output is checked against `megatron` once per case (the tool
                       stops if they differ); it still builds and runs its (frozen) importance MLP.
  anyexperts_variable  K_max = k slots (k_min = 1), every token's importance set so that mean
                       real slots per token is r = max(1, f k) for each --real-fraction f (k > 1).
  floor                per expert, dense fc1 -> activation -> fc2 on exactly that expert's
                       routed token count (the megatron layer's routing; the variable rows get
                       their own routing's floor), forward + backward, nothing else.

With CUDA the layers sit on the current GPU (megatron's placement without CPU initialisation),
the inputs are put beside them, each timed step ends with torch.cuda.synchronize(), and the rows
name the device (`device`); read --dtype bf16 there (auto's GPU path is grouped_mm, bf16 only).
All layers hold the same router and expert weights. Columns per row: layer_ms (that row's
time), megatron_ms, floor_ms, layer_over_megatron, layer_over_floor, megatron_over_floor and
their CPU-time twins (*_cpu_ms, cpu_*); real_per_token (real slots computed per token). In
anyexperts_variable rows floor_ms is the floor of their own routing, megatron_ms megatron at
top-k (the layer it replaces), time_ratio = time(r) / time(anyexperts_fixed_k) against
expected_ratio = real_per_token / k and against floor_ratio = floor(r) / floor(k), the ratio
the expert math alone reaches on the two routings (with few rows per expert it stays above
r / k: each active expert reads its weights and writes its gradients whatever its row count);
within_5pct and within_5pct_of_floor_ratio say whether time_ratio is within 5% of each. The
anyexperts_fixed_k and topk rows carry layer_over_floor_for_target = 0.95 x
megatron_over_floor, the layer / floor that layer / megatron <= 0.95 demands (below 1: faster
than the expert math alone). anyexperts_fixed_k rows carry output_rel_diff (max |ours -
megatron| / max |megatron|); the rows of the project's layers name the expert_path GroupedExperts
ran (--expert-path; auto: the shape rule of anyexperts/moe/expert_paths.py; measure: timed on first
use of the shape, during the warm-up). Targets (the issue): layer / megatron <= 0.95, layer / floor <= 1.15,
time_ratio within 5% of expected_ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.distributed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatcher import floor_step, print_columns, time_interleaved  # noqa: E402

FULL_EXPERTS, FULL_TOKENS, FULL_TOPK = [8, 16, 64, 128], [1024, 4096, 16384], [1, 2, 4, 8]
# Relative output difference the equality check allows: megatron's SequentialMLP and our
# GroupedExperts sum in different orders (and apply the gate at different points).
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}


def project_config(*, num_experts: int, topk: int, hidden: int, ffn: int, dtype: str, expert_path: str = "auto"):
    """(TrainConfig, TransformerConfig) of a one-layer `moe=topk moe.grouped_gemm=true` run of these
    sizes: the layers below all take the run's own megatron settings (activation, router dtype, init)."""
    from anyexperts.config import TrainConfig
    from anyexperts.model import transformer_config

    cfg = TrainConfig()
    cfg.model = dataclasses.replace(cfg.model, num_layers=1, hidden_size=hidden, num_attention_heads=1)
    cfg.moe = dataclasses.replace(cfg.moe, kind="topk", num_experts=num_experts, expert_ffn_hidden_size=ffn,
                                  router_topk=topk, layer_freq=1, grouped_gemm=True, expert_path=expert_path)
    cfg.trainer = dataclasses.replace(cfg.trainer, precision=dtype)
    return cfg, transformer_config(cfg)


def reduction_settings(topk: int):
    """AnyExperts settings under which the layer is megatron's top-k MoELayer (aux losses off)."""
    from anyexperts import AnyExpertsConfig

    return AnyExpertsConfig(k_min=topk, k_max=topk, num_virtual_experts=0, rho_max=0.0, alpha=0.0,
                            load_balance_coeff=0.0, budget_coeff=0.0, z_loss_coeff=0.0)


class Layers:
    """megatron, topk, anyexperts_fixed_k and anyexperts_variable layers of one (E, k), same weights."""

    def __init__(self, *, num_experts: int, topk: int, hidden: int, ffn: int, dtype: str,
                 real_fractions: list, seed: int, expert_path: str = "auto") -> None:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
        from megatron.core.transformer.spec_utils import build_module

        from anyexperts.model import layer_specs
        from anyexperts.moe.specs import get_anyexperts_moe_spec

        cfg, config = project_config(num_experts=num_experts, topk=topk, hidden=hidden, ffn=ffn, dtype=dtype,
                                     expert_path=expert_path)
        self.config, self.num_experts, self.topk, self.hidden = config, num_experts, topk, hidden
        self.device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        torch.manual_seed(seed)
        ref_config = dataclasses.replace(config, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                                         moe_z_loss_coeff=None)
        if topk == 1:
            # megatron refuses top-1 without pre-softmax (its gate is then 1: no router gradient);
            # the reduction's top-1 gate is 1, so switch it off after validation: same work.
            ref_config.moe_router_pre_softmax = False
        self.megatron = build_module(get_moe_module_spec(use_te=False, num_experts=num_experts,
                                                         moe_grouped_gemm=False), config=ref_config, layer_number=1)
        if not (isinstance(self.megatron.experts, SequentialMLP)
                and isinstance(self.megatron.token_dispatcher, MoEAlltoAllTokenDispatcher)):
            raise RuntimeError(f"megatron built {type(self.megatron.experts).__name__} with "
                               f"{type(self.megatron.token_dispatcher).__name__}, not SequentialMLP with alltoall")
        self.topk_layer = build_module(layer_specs(cfg, config)[0].submodules.mlp, config=config, layer_number=1)
        with torch.no_grad():
            self.topk_layer.router.weight.copy_(self.megatron.router.weight)
            self.topk_layer.experts.load_from_sequential_mlp(self.megatron.experts)

        def anyexperts(ae, layer_number):
            # Distinct layer numbers: each layer records its own statistics (stats.py keys by layer).
            layer = build_module(get_anyexperts_moe_spec(ae, expert_path=expert_path), config=config,
                                 layer_number=layer_number)
            with torch.no_grad():
                layer.router.weight.copy_(self.megatron.router.weight)
                layer.experts.load_from_sequential_mlp(self.megatron.experts)
            return layer

        self.fixed = anyexperts(reduction_settings(topk), 1)
        self.variable = {}
        for fraction in real_fractions if topk > 1 else ():
            mean_real = max(1.0, fraction * topk)
            layer = anyexperts(dataclasses.replace(reduction_settings(topk), k_min=1), 2 + len(self.variable))
            # Every token's w = (r - 1) / (k - 1): kappa = r, and the positional dither of the
            # straight-through rounding (the default) spreads K so that its mean is r.
            w = (mean_real - 1) / (topk - 1)
            with torch.no_grad():
                layer.importance.fc2.weight.zero_()
                layer.importance.fc2.bias.fill_(float(torch.logit(torch.tensor(w, dtype=torch.float64)).clamp(min=-30)))
            self.variable[mean_real] = layer
        self.timed = dict(megatron=self.megatron, topk=self.topk_layer, anyexperts_fixed_k=self.fixed)
        self.timed.update({f"anyexperts_variable_r{r:g}": layer for r, layer in self.variable.items()})
        for layer in self.timed.values():
            layer.train()


def inputs(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int, device="cpu"):
    """(hidden_SBH, grad_SBH): one sequence of num_tokens positions, batch 1 (the dither uses s)."""
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    hidden_SBH = torch.randn(num_tokens, 1, hidden, generator=gen).to(device, dtype)
    return hidden_SBH, torch.randn(num_tokens, 1, hidden, generator=gen).to(device, dtype)


@torch.no_grad()
def routed_counts(layer, hidden_SBH) -> tuple[list, float]:
    """(real slots per expert, mean real slots per token) of one forward of a layer, as it computes them."""
    from anyexperts.moe.layer import AnyExpertsMoELayer
    from anyexperts.moe.trace import routing_trace

    if isinstance(layer, AnyExpertsMoELayer):  # its own routing trace, after capacity
        with routing_trace() as trace:
            layer(hidden_SBH)
        record = trace[0]
        real_TK = (record["expert_ids"] >= 0) & ~record["virtual_mask"] & ~record["dropped_mask"]
        ids_N = record["expert_ids"][real_TK]
    else:
        _, routing_map_TE = layer.router(hidden_SBH)
        ids_N = routing_map_TE.nonzero()[:, 1]
    counts_E = torch.bincount(ids_N, minlength=layer.config.num_moe_experts)
    return counts_E.tolist(), float(ids_N.numel() / hidden_SBH[..., 0].numel())


@torch.no_grad()
def check_same_output(layers: Layers, hidden_SBH, tolerance: float) -> dict:
    """Relative output differences of anyexperts_fixed_k (and topk, k > 1) against megatron; raises
    if they differ: a benchmark of two different computations says nothing."""
    reference = layers.megatron(hidden_SBH)[0]
    scale = reference.abs().max().clamp(min=1e-30)
    diffs = {"anyexperts_fixed_k": float((layers.fixed(hidden_SBH)[0] - reference).abs().max() / scale)}
    if layers.topk > 1:  # top-1 of the project's topk path has pre-softmax gates: other values, same work
        diffs["topk"] = float((layers.topk_layer(hidden_SBH)[0] - reference).abs().max() / scale)
    for name, diff in diffs.items():
        if not diff <= tolerance:
            raise AssertionError(f"{name} output differs from megatron's MoELayer at E={layers.num_experts} "
                                 f"T={hidden_SBH.shape[0]} k={layers.topk}: relative {diff:.3e} > {tolerance:g}")
    return diffs


def layer_step(layer, hidden_SBH, grad_SBH):
    """Forward + backward of a layer from a fresh leaf input, its parameter grads cleared first."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for param in params:
            param.grad = None
        x_SBH = hidden_SBH.clone().requires_grad_(True)
        out_SBH, _ = layer(x_SBH)
        out_SBH.backward(grad_SBH)

    return step


def _row(case, num_tokens, layers, times, name, megatron_name, floor_name, real_per_token, **extra):
    """One result row; times[name] = (wall, cpu) seconds."""
    ms = lambda t, i: round(t[i] * 1e3, 3)  # noqa: E731
    ratio = lambda a, b, i: round(times[a][i] / times[b][i], 4)  # noqa: E731
    row = dict(case=case, device=layers.device_name, num_tokens=num_tokens, num_experts=layers.num_experts,
               topk=layers.topk,
               real_per_token=round(real_per_token, 4),
               layer_ms=ms(times[name], 0), megatron_ms=ms(times[megatron_name], 0), floor_ms=ms(times[floor_name], 0),
               layer_over_megatron=ratio(name, megatron_name, 0), layer_over_floor=ratio(name, floor_name, 0),
               megatron_over_floor=ratio(megatron_name, floor_name, 0),
               layer_cpu_ms=ms(times[name], 1), megatron_cpu_ms=ms(times[megatron_name], 1),
               floor_cpu_ms=ms(times[floor_name], 1),
               cpu_layer_over_megatron=ratio(name, megatron_name, 1), cpu_layer_over_floor=ratio(name, floor_name, 1),
               cpu_megatron_over_floor=ratio(megatron_name, floor_name, 1))
    row.update(extra)
    return row


def bench_case(layers: Layers, num_tokens: int, opts: dict) -> list:
    from anyexperts.moe import stats

    # Timed as the steps the trainer does not log: no statistics (stats.record_training). A
    # fresh sink per case all the same, since k_histogram's and tokens_per_expert's shapes
    # change with (E, k).
    stats.reset()
    stats.record_training(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts["dtype"]]
    seed = opts["seed"] + num_tokens
    # megatron puts the layers on the current CUDA device when there is one (no CPU initialisation).
    device = layers.megatron.router.weight.device
    hidden_SBH, grad_SBH = inputs(num_tokens, layers.hidden, dtype, seed, device)
    diffs = check_same_output(layers, hidden_SBH, TOLERANCE[opts["dtype"]])
    counts, real = routed_counts(layers.megatron, hidden_SBH)
    fixed_counts, fixed_real = routed_counts(layers.fixed, hidden_SBH)
    if fixed_counts != counts:
        raise AssertionError(f"anyexperts_fixed_k routes {fixed_counts}, megatron {counts}")
    steps = {name: layer_step(layer, hidden_SBH, grad_SBH) for name, layer in layers.timed.items()}
    steps["floor"] = floor_step(layers.megatron.experts, layers.config, counts, seed)
    variable_real = {}
    for r, layer in layers.variable.items():
        var_counts, variable_real[r] = routed_counts(layer, hidden_SBH)
        steps[f"floor_r{r:g}"] = floor_step(layers.megatron.experts, layers.config, var_counts, seed)
    try:
        times = time_interleaved(steps, opts["repeats"], None)
    finally:
        stats.record_training(True)

    def row(case, name, floor_name="floor", real_per_token=real, **extra):
        return _row(case, num_tokens, layers, times, name, "megatron", floor_name, real_per_token, **extra)

    rows = [row("megatron", "megatron"), row("floor", "floor"),
            row("anyexperts_fixed_k", "anyexperts_fixed_k", real_per_token=fixed_real,
                output_rel_diff=diffs["anyexperts_fixed_k"], expert_path=layers.fixed.experts.last_path),
            row("topk", "topk", output_rel_diff=diffs.get("topk"), expert_path=layers.topk_layer.experts.last_path)]
    for r in layers.variable:
        name = f"anyexperts_variable_r{r:g}"
        measured = [times[name][i] / times["anyexperts_fixed_k"][i] for i in range(2)]
        expected = variable_real[r] / layers.topk
        # What the expert math alone allows: with few rows per expert each active expert costs
        # a fixed weight read and gradient write, and the floor's own time does not fall as r / k.
        floor_ratio = times[f"floor_r{r:g}"][0] / times["floor"][0]
        rows.append(row("anyexperts_variable", name, f"floor_r{r:g}", variable_real[r],
                        expert_path=layers.variable[r].experts.last_path,
                        target_real_per_token=r, time_ratio=round(measured[0], 4),
                        cpu_time_ratio=round(measured[1], 4), expected_ratio=round(expected, 4),
                        floor_ratio=round(floor_ratio, 4),
                        within_5pct=abs(measured[0] / expected - 1) <= 0.05,
                        cpu_within_5pct=abs(measured[1] / expected - 1) <= 0.05,
                        within_5pct_of_floor_ratio=abs(measured[0] / floor_ratio - 1) <= 0.05))
    for fixed_row in (r for r in rows if r["case"] in ("anyexperts_fixed_k", "topk")):
        # layer / floor that layer / megatron <= 0.95 demands; below 1 it means beating the floor.
        fixed_row["layer_over_floor_for_target"] = round(0.95 * fixed_row["megatron_over_floor"], 4)
    return rows


def bench(rank: int, world_size: int, opts: dict) -> list:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    torch.set_num_threads(opts["threads"])  # the harness sets 1; the benchmark takes what it was given
    from anyexperts.training import host_memory

    host_memory.keep_freed_memory()  # as the trainer does (trainer.keep_freed_memory); every variant alike
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # the topk layer's aux loss needs a scale
    rows = []
    for num_experts in opts["experts"]:
        for topk in (k for k in opts["topk"] if k <= num_experts):
            layers = Layers(num_experts=num_experts, topk=topk, hidden=opts["hidden"], ffn=opts["ffn"],
                            dtype=opts["dtype"], real_fractions=opts["real_fraction"], seed=opts["seed"],
                            expert_path=opts["expert_path"])
            for num_tokens in opts["tokens"]:
                rows += bench_case(layers, num_tokens, opts)
    return rows


COLUMNS = ["case", "num_tokens", "num_experts", "topk", "real_per_token", "layer_ms", "megatron_ms", "floor_ms",
           "layer_over_megatron", "layer_over_floor", "megatron_over_floor", "cpu_layer_over_megatron",
           "cpu_layer_over_floor", "cpu_megatron_over_floor", "layer_over_floor_for_target", "time_ratio",
           "cpu_time_ratio", "expected_ratio", "floor_ratio", "output_rel_diff", "expert_path"]


def print_table(rows: list) -> None:
    shown = [{k: (f"{v:.1e}" if k == "output_rel_diff" and v is not None else v) for k, v in row.items()}
             for row in rows]
    print_columns(shown, COLUMNS)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--topk", type=int, nargs="+", default=[2, 4], help="k (K_max of the variable rows)")
    parser.add_argument("--real-fraction", type=float, nargs="+", default=[0.5],
                        help="variable rows: mean real slots per token r = max(1, fraction * k)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--expert-path", default="auto", choices=("auto", "measure", "grouped_mm", "loop", "blocked"),
                        help="GroupedExperts' compute path in the anyexperts and topk rows (moe.expert_path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one tiny case: 8 experts, 256 tokens, k 2, 3 repeats")
    parser.add_argument("--full", action="store_true",
                        help="experts 8, 16, 64, 128 x tokens 1k, 4k, 16k x k 1, 2, 4, 8 (long)")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if not all(0 < f < 1 for f in args.real_fraction):
        parser.error("--real-fraction: each value must lie in (0, 1) (r < k real slots per token)")
    if args.quick:
        args.experts, args.tokens, args.topk, args.repeats = [8], [256], [2], 3
    if args.full:
        args.experts, args.tokens, args.topk = FULL_EXPERTS, FULL_TOKENS, FULL_TOPK
    from tests.distributed import run_distributed

    opts = {k: v for k, v in vars(args).items() if k not in ("json", "quick", "full")}
    opts["threads"] = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    rows = run_distributed(bench, 1, args=(opts,), expert_parallel_size=1, timeout=24 * 3600.0)[0]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
