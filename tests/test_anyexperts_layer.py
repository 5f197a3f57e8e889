"""The AnyExperts MoE layer inside megatron-core, in one gloo process (world of 1).

    OMP_NUM_THREADS=1 python -m pytest tests/test_anyexperts_layer.py -q

One spawn runs every case (a spawn costs more than the cases) and returns the numbers the
tests then check:
- reduction: k_min = k_max = k, rho_max = 0, V = 0, alpha = 0 against megatron-core's
  MoELayer (top-k softmax, alltoall dispatcher, SequentialMLP, aux losses off), same
  weights, float64: outputs, input / router / expert gradients, with our layer running
  megatron's SequentialMLP and the project's GroupedExperts, and the project's top-k path
  (moe=topk moe.grouped_gemm=true: megatron's MoELayer and router, the project's dispatcher and
  GroupedExperts). Tolerance 1e-6 relative to
  the values' scale: megatron computes the top-k softmax in float32 even in a float64
  model (moe_utils.topk_routing_with_score_function, dtype=torch.float32), which leaves
  differences of ~1e-9 relative; everything else agrees to float64 rounding.
- a GPTModel built by anyexperts.model.build_model with the AnyExperts spec: forward and
  backward, statistics per layer, routing trace (saved and read back), gradients on every
  AnyExperts parameter, expert-parallel flags, sharded_state_dict, bias balancing update.
- capacity with a tiny factor: tokens whose every real slot was dropped still get exactly
  their virtual term plus the residual fusion, and the dropped count is recorded.
- eval mode records nothing unless stats are enabled; a bf16 layer runs.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed


def transformer_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=4,
                  moe_ffn_hidden_size=8, moe_router_topk=2, moe_router_load_balancing_type="none",
                  moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
                  params_dtype=torch.float64, moe_router_dtype="fp64", use_cpu_initialization=True,
                  gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
                  gradient_accumulation_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_layer(config, ae, *, expert_module=None, pg_collection=None, layer_number=1):
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts.moe.specs import get_anyexperts_moe_spec

    spec = get_anyexperts_moe_spec(ae, expert_module=expert_module)
    return build_module(spec, config=config, layer_number=layer_number, pg_collection=pg_collection)


def no_process_groups():
    """A ProcessGroupCollection for a layer built in this process (every group None: size 1),
    with the CPU patches applied: no spawn needed."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from anyexperts import cpu_support

    cpu_support.apply()
    groups = ProcessGroupCollection()
    for name in ("tp", "cp", "tp_cp", "tp_dp_cp", "dp", "dp_cp", "ep", "expt_tp", "expt_dp", "tp_ep", "pp"):
        setattr(groups, name, None)
    return groups


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------------- rank code

def _reduction(expert_module_name: str, num_experts: int, topk: int) -> dict:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module

    from anyexperts import AnyExpertsConfig
    from anyexperts.moe import stats
    from anyexperts.moe.specs import grouped_experts_spec
    from anyexperts.moe.topk_layer import TopKMoELayer

    stats.reset()
    torch.manual_seed(num_experts * 10 + topk)
    config = transformer_config(num_moe_experts=num_experts, moe_router_topk=topk)
    reference = build_module(get_moe_module_spec(use_te=False, num_experts=num_experts), config=config,
                             layer_number=1)
    # The learned allocation (the default) with one slot count: nothing left to allocate.
    ae = AnyExpertsConfig(k_min=topk, k_max=topk, k_rounding="fractional", num_virtual_experts=0, rho_max=0.0,
                          alpha=0.0, load_balance_coeff=0.0, budget_coeff=0.0, z_loss_coeff=0.0)
    use_sequential = expert_module_name == "SequentialMLP"
    ours = build_layer(config, ae, expert_module=SequentialMLP if use_sequential else None)
    with torch.no_grad():
        ours.router.weight.copy_(reference.router.weight)
        if use_sequential:
            ours.experts.load_state_dict(reference.experts.state_dict())
        else:
            ours.experts.load_from_sequential_mlp(reference.experts)
    # The project's top-k path (moe=topk moe.grouped_gemm=true): megatron's MoELayer and router,
    # the project's dispatcher and GroupedExperts (anyexperts.model.layer_specs builds the same).
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts)
    spec.module, spec.submodules.experts = TopKMoELayer, grouped_experts_spec("auto")
    topk_grouped = build_module(spec, config=config, layer_number=1)
    with torch.no_grad():
        topk_grouped.router.weight.copy_(reference.router.weight)
        topk_grouped.experts.load_from_sequential_mlp(reference.experts)
    importance_calls = []
    ours.importance.register_forward_hook(lambda *args: importance_calls.append(1))
    hidden = torch.randn(6, 3, config.hidden_size, dtype=torch.float64)
    grad_out = torch.randn_like(hidden)
    results = {}
    for name, layer in (("reference", reference), ("ours", ours), ("topk_grouped", topk_grouped)):
        layer.train()
        x = hidden.clone().requires_grad_(True)
        y, bias = layer(x)
        assert bias is None
        (y * grad_out).sum().backward()
        results[name] = dict(y=y.detach(), x_grad=x.grad, router_grad=layer.router.weight.grad.clone())
    ref_experts = reference.experts.local_experts
    if use_sequential:
        expert_pairs = [(ours.experts.local_experts[e].linear_fc1.weight.grad, ref_experts[e].linear_fc1.weight.grad)
                        for e in range(num_experts)]
        expert_pairs += [(ours.experts.local_experts[e].linear_fc2.weight.grad, ref_experts[e].linear_fc2.weight.grad)
                         for e in range(num_experts)]
    else:
        expert_pairs = [(ours.experts.fc1_weight.grad[e].t(), ref_experts[e].linear_fc1.weight.grad)
                        for e in range(num_experts)]
        expert_pairs += [(ours.experts.fc2_weight.grad[e].t(), ref_experts[e].linear_fc2.weight.grad)
                         for e in range(num_experts)]
    expert_pairs += [(topk_grouped.experts.fc1_weight.grad[e].t(), ref_experts[e].linear_fc1.weight.grad)
                     for e in range(num_experts)]
    expert_pairs += [(topk_grouped.experts.fc2_weight.grad[e].t(), ref_experts[e].linear_fc2.weight.grad)
                     for e in range(num_experts)]
    b = results["reference"]
    diffs = {key: max(rel_diff(results[name][key], b[key]) for name in ("ours", "topk_grouped"))
             for key in ("y", "x_grad", "router_grad")}
    return dict(output=diffs["y"], input_grad=diffs["x_grad"], router_grad=diffs["router_grad"],
                expert_grads=max(rel_diff(x, y) for x, y in expert_pairs),
                importance_has_no_grad=all(p.grad is None for p in ours.importance.parameters()),
                importance_not_computed=not importance_calls and not ours.computes_importance)


def _gpt_model(tmp_dir: str) -> dict:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from anyexperts import AnyExpertsConfig
    from anyexperts.config import TrainConfig
    from anyexperts.model import build_model
    from anyexperts.moe import losses, stats
    from anyexperts.moe.layer import AnyExpertsMoELayer
    from anyexperts.moe.trace import load_trace, routing_trace, save_trace

    cfg = TrainConfig()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=8,
                                    make_vocab_size_divisible_by=16)
    cfg.trainer = dataclasses.replace(cfg.trainer, precision="fp32", seed=3)
    cfg.moe = dataclasses.replace(cfg.moe, kind="anyexperts", num_experts=4, expert_ffn_hidden_size=16,
                                  anyexperts=AnyExpertsConfig(k_min=1, k_max=3, num_virtual_experts=2, rho_max=0.34,
                                                              virtual_kind="constant", gate_norm="real",
                                                              alpha=0.1, learn_alpha=True, budget_target=2.0,
                                                              capacity_factor=1.0, bias_update_rate=0.01))
    model_parallel_cuda_manual_seed(3)
    model = build_model(cfg, vocab_size=40)
    model.train()
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(8).expand(2, 8)
    stats.reset()
    losses.reset_global_batch_state(model)
    with routing_trace() as trace:
        loss = model(tokens, position_ids, None, labels=tokens)
    loss.mean().backward()
    collected = stats.collect()
    save_trace(trace, f"{tmp_dir}/trace.pt")
    save_trace(trace, f"{tmp_dir}/trace.npz")
    reloaded = {suffix: load_trace(f"{tmp_dir}/trace.{suffix}") for suffix in ("pt", "npz")}
    layers = [m for m in model.modules() if isinstance(m, AnyExpertsMoELayer)]
    missing_grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    flags = {n: getattr(p, "allreduce", True) for n, p in model.named_parameters()}
    bias_before = layers[0].router.selection_bias.clone()
    loads_before = layers[0].router.bias_tokens_per_expert.clone()
    losses.update_selection_biases(model)
    sharded_keys = sorted(model.sharded_state_dict().keys())
    return dict(num_layers=len(layers), layer_numbers=[m.layer_number for m in layers],
                stats={name: {k: v.clone() for k, v in per_layer.items()} for name, per_layer in collected.items()},
                trace=trace, reloaded=reloaded, num_tokens=tokens.numel(), missing_grads=missing_grads,
                allreduce_flags=flags, bias_change=(layers[0].router.selection_bias - bias_before), loads=loads_before,
                bias_counts_after=layers[0].router.bias_tokens_per_expert.clone(), sharded_keys=sharded_keys,
                loss=loss.mean().item())


def _capacity_and_modes() -> dict:
    from anyexperts import AnyExpertsConfig
    from anyexperts.moe import stats
    from anyexperts.moe.trace import routing_trace

    torch.manual_seed(5)
    config = transformer_config()
    ae = AnyExpertsConfig(k_min=1, k_max=4, num_virtual_experts=2, rho_max=0.5, virtual_kind="copy",
                          gate_norm="all", alpha=0.3, capacity_factor=0.05, z_loss_coeff=0.0,
                          load_balance_coeff=0.0, budget_coeff=0.0)
    layer = build_layer(config, ae)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # spread the router so that virtual slots occur
        layer.importance.fc2.weight.normal_(0, 2.0)
    hidden = torch.randn(32, 1, config.hidden_size, dtype=torch.float64)
    stats.reset()
    layer.train()
    with routing_trace() as trace:
        out, _ = layer(hidden)
    record = trace[0]
    real_TK = (record["expert_ids"] >= 0) & ~record["virtual_mask"]
    all_dropped_T = (real_TK.sum(-1) > 0) & (record["dropped_mask"] | ~real_TK).all(-1)
    virtual_gate_T = (record["gates"].double() * record["virtual_mask"]).sum(-1)
    h = hidden.view(32, -1)
    expected = virtual_gate_T.unsqueeze(-1) * h + 0.3 * record["importance"].double().unsqueeze(-1) * h
    collected = stats.collect()
    result = dict(num_all_dropped=int(all_dropped_T.sum()),
                  num_with_virtual=int((all_dropped_T & (virtual_gate_T > 0)).sum()),
                  all_dropped_error=float((out.view(32, -1)[all_dropped_T] - expected[all_dropped_T]).abs().max()),
                  dropped_recorded=float(collected["dropped_slots"][1]),
                  dropped_traced=int(record["dropped_mask"].sum()))
    # A rank may get no tokens at all: the layer still runs forward and backward.
    layer.train()
    empty = torch.zeros(0, 1, config.hidden_size, dtype=torch.float64, requires_grad=True)
    out_empty, _ = layer(empty)
    out_empty.sum().backward()
    result["empty"] = (tuple(out_empty.shape), tuple(empty.grad.shape))
    # Eval: nothing recorded unless stats are enabled.
    layer.eval()
    stats.reset()
    with torch.no_grad():
        layer(hidden)
    result["eval_names"] = sorted(stats.collect())
    stats.set_enabled(True)
    with torch.no_grad():
        layer(hidden)
    stats.set_enabled(False)
    result["eval_enabled_names"] = sorted(stats.collect())
    stats.reset()
    # bf16 parameters and input, fp32 router: runs and stays finite.
    bf16 = build_layer(transformer_config(params_dtype=torch.bfloat16, moe_router_dtype="fp32",
                                          bf16=True, hidden_size=32), copy.deepcopy(ae))
    x = torch.randn(8, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    y, _ = bf16(x)
    y.float().square().sum().backward()
    result["bf16"] = (y.dtype, bool(torch.isfinite(y).all()), bool(torch.isfinite(x.grad).all()))
    bf16.bfloat16()  # what megatron's Float16Module does to the whole model
    result["bf16_buffer_dtypes"] = (bf16.router.selection_bias.dtype, bf16.router.bias_tokens_per_expert.dtype,
                                    bf16.aux_losses.global_sums.dtype, bf16.router.weight.dtype)
    return result


def _world_one(rank, world_size, tmp_dir):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return dict(reduction={(name, e, k): _reduction(name, e, k)
                           for name, e, k in (("SequentialMLP", 4, 2), ("GroupedExperts", 6, 3),
                                              ("GroupedExperts", 8, 4))},
                gpt=_gpt_model(tmp_dir), capacity=_capacity_and_modes())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_dir = str(tmp_path_factory.mktemp("anyexperts_layer"))
    return run_distributed(_world_one, 1, args=(tmp_dir,), expert_parallel_size=1)[0]


# ----------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", [("SequentialMLP", 4, 2), ("GroupedExperts", 6, 3), ("GroupedExperts", 8, 4)])
def test_reduction_to_megatron_topk_moe(results, case):
    diffs = results["reduction"][case]
    for name in ("output", "input_grad", "router_grad", "expert_grads"):
        assert diffs[name] <= 1e-6, f"{case} {name}: relative difference {diffs[name]:.2e}"
    # w sets nothing when k_min = k_max and alpha = 0: its MLP is frozen, not silently untrained,
    # and not run at all.
    assert diffs["importance_has_no_grad"] and diffs["importance_not_computed"]


def test_gpt_model_with_anyexperts_layers_trains(results):
    gpt = results["gpt"]
    assert gpt["num_layers"] == 2 and gpt["layer_numbers"] == [1, 2]
    assert gpt["missing_grads"] == [], f"parameters without gradient: {gpt['missing_grads']}"
    flags = gpt["allreduce_flags"]
    # EP = 1: megatron marks expert weights allreduce=True too (they are plain data-parallel).
    assert all(flags.values())
    assert any(".mlp.importance." in n for n in flags) and any(".mlp.virtual_experts.constant_VH" in n for n in flags)
    assert any(k.endswith("mlp.router.weight") for k in gpt["sharded_keys"])
    assert any(k.endswith("mlp.router.selection_bias") for k in gpt["sharded_keys"])


def test_gpt_model_records_every_statistic_per_layer(results):
    collected, num_tokens = results["gpt"]["stats"], results["gpt"]["num_tokens"]
    for name in ("real_experts_per_token", "virtual_experts_per_token", "k_histogram", "importance_mean",
                 "importance_std", "tokens_per_expert", "load_imbalance", "dropped_slots", "load_balance_loss",
                 "budget_loss", "z_loss", "a2a_bytes", "load_imbalance_global"):
        assert sorted(collected[name]) == [1, 2], name
    for layer in (1, 2):
        assert float(collected["k_histogram"][layer].sum()) == num_tokens
        assert collected["tokens_per_expert"][layer].shape == (4,)
        real = float(collected["real_experts_per_token"][layer])
        kept = float(collected["tokens_per_expert"][layer].sum()) / num_tokens
        dropped = float(collected["dropped_slots"][layer]) / num_tokens
        assert abs(real - kept - dropped) < 1e-6, "kept + dropped must equal the real slots"
        assert 1 <= real <= 3 and float(collected["virtual_experts_per_token"][layer]) <= 1
        assert float(collected["a2a_bytes"][layer]) == 0.0  # one rank sends nothing


def test_routing_trace_records_each_layer_and_round_trips(results):
    gpt = results["gpt"]
    trace = gpt["trace"]
    assert [r["layer_number"] for r in trace] == [1, 2]
    for record in trace:
        num_tokens = gpt["num_tokens"]
        assert record["importance"].shape == (num_tokens,) and record["k"].shape == (num_tokens,)
        assert record["expert_ids"].shape == (num_tokens, 3) == record["virtual_mask"].shape
        used = record["expert_ids"] >= 0
        assert torch.equal(used.sum(-1), record["k"])
        assert torch.equal(record["virtual_mask"], record["expert_ids"] >= record["num_experts"])
    for reloaded in gpt["reloaded"].values():
        assert len(reloaded) == 2
        for a, b in zip(trace, reloaded):
            assert a["layer_number"] == b["layer_number"]
            assert torch.equal(a["expert_ids"], b["expert_ids"]) and torch.equal(a["importance"], b["importance"])


def test_selection_bias_update_follows_the_load(results):
    gpt = results["gpt"]
    change = gpt["bias_change"]
    steps = change.abs()
    assert bool(((steps == 0) | torch.isclose(steps, torch.tensor(0.01))).all()) and steps.sum() > 0
    loads = gpt["loads"]
    assert float(loads.sum()) > 0
    assert torch.equal(torch.sign(change), torch.sign(loads.mean() - loads))
    assert float(gpt["bias_counts_after"].abs().sum()) == 0.0  # counts restart after an update


def test_fully_dropped_tokens_keep_virtual_term_and_residual(results):
    cap = results["capacity"]
    assert cap["num_all_dropped"] > 0 and cap["num_with_virtual"] > 0
    # The trace keeps gates in float32, hence the expected value's float32 rounding.
    assert cap["all_dropped_error"] < 1e-6
    assert cap["dropped_recorded"] == cap["dropped_traced"] > 0


def test_eval_records_only_when_enabled_and_bf16_runs(results):
    cap = results["capacity"]
    assert cap["empty"] == ((0, 1, 16), (0, 1, 16))
    assert cap["eval_names"] == []
    assert "real_experts_per_token" in cap["eval_enabled_names"] and "z_loss" not in cap["eval_enabled_names"]
    dtype, finite_out, finite_grad = cap["bf16"]
    assert dtype == torch.bfloat16 and finite_out and finite_grad
    assert cap["bf16_buffer_dtypes"] == (torch.float32, torch.float32, torch.float64, torch.bfloat16)
