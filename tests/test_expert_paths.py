"""GroupedExperts' compute paths: the blocked SwiGLU pipeline's gradients, and the per-shape choice.

    OMP_NUM_THREADS=1 python -m pytest tests/test_expert_paths.py -q

Equality of every path with megatron's SequentialMLP (outputs and gradients) is in
tests/test_experts.py, and through the dispatcher at EP=2 and 4 in tests/test_dispatcher.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from anyexperts.moe import expert_paths
from anyexperts.moe.expert_paths import blocked_swiglu_experts, choose_path


def _reference(x_NH, p_N, w1_EHF2, w2_EFH, counts):
    outs, start = [], 0
    for expert, count in enumerate(counts):
        a, b = (x_NH[start:start + count] @ w1_EHF2[expert]).chunk(2, dim=-1)
        outs.append((F.silu(a) * b * p_N[start:start + count, None]) @ w2_EFH[expert])
        start += count
    return torch.cat(outs)


@pytest.mark.parametrize("rows", [1, 2, 3, 64])
def test_blocked_gradcheck_with_several_blocks_per_expert_and_idle_experts(rows):
    gen = torch.Generator().manual_seed(rows)
    counts = [5, 0, 3, 1]
    x = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    p = torch.rand(9, dtype=torch.float64, generator=gen, requires_grad=True)
    w1 = torch.randn(4, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(4, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda *args: blocked_swiglu_experts(*args, counts, rows=rows)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, p, w1, w2))
    torch.testing.assert_close(fn(x, p, w1, w2), _reference(x, p, w1, w2, counts), rtol=0, atol=1e-12)
    # An idle expert's weight gradient is exactly zero (written, not left uninitialised).
    fn(x, p, w1, w2).sum().backward()
    assert torch.count_nonzero(w1.grad[1]) == 0 and torch.count_nonzero(w2.grad[1]) == 0


def test_blocked_without_grad_saves_nothing_and_gives_the_same_output():
    gen = torch.Generator().manual_seed(0)
    counts = [300, 0, 200]
    x = torch.randn(500, 16, generator=gen)
    p = torch.rand(500, generator=gen)
    w1, w2 = torch.randn(3, 16, 24, generator=gen), torch.randn(3, 12, 16, generator=gen)
    with torch.no_grad():
        out = blocked_swiglu_experts(x, p, w1, w2, counts, rows=64)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(x, p, w1, w2, counts), rtol=1e-5, atol=1e-5)


def test_block_rows_keep_a_block_cache_sized():
    assert expert_paths.block_rows(1024, 4) == 512      # F = 512 in fp32: a 2 MiB fc1 block
    assert expert_paths.block_rows(1 << 16, 4) == 64    # huge F: never fewer than 64 rows
    assert expert_paths.block_rows(8, 4) == 1024        # tiny F: never more than 1024


@pytest.fixture
def empty_cache():
    expert_paths.clear_cache()
    yield
    expert_paths.clear_cache()


def test_measure_times_each_shape_once_keeps_the_fastest_and_logs_it(empty_cache, caplog):
    calls = []
    seconds = {"grouped_mm": 3.0, "loop": 2.0, "blocked": 1.0}

    def time_path(path):
        calls.append(path)
        return seconds[path]

    key = ("cpu", "float32", 8, 256, 512, True, True, 11, 1)
    with caplog.at_level(logging.INFO, logger="anyexperts.moe.expert_paths"):
        assert choose_path("measure", key, ["grouped_mm", "loop", "blocked"], time_path) == "blocked"
        assert choose_path("measure", key, ["grouped_mm", "loop", "blocked"], time_path) == "blocked"
    assert calls == ["grouped_mm", "loop", "blocked"]  # timed once
    assert expert_paths.cached_choices()[("measure", key)][0] == "blocked"
    messages = [r.getMessage() for r in caplog.records if "expert path" in r.getMessage()]
    assert len(messages) == 1 and "blocked" in messages[0] and "2048-4095 rows" in messages[0]
    # Another shape bucket is timed on its own.
    other = key[:7] + (12, 1)
    assert choose_path("measure", other, ["grouped_mm", "loop"], lambda p: {"grouped_mm": 1.0, "loop": 2.0}[p]) \
        == "grouped_mm"


def test_measure_keeps_the_first_candidate_unless_another_is_clearly_faster(empty_cache):
    key = ("cpu", "float32", 8, 256, 512, True, True, 11, 1)
    near = {"grouped_mm": 1.0, "blocked": 1.0 - expert_paths.SWITCH_MARGIN / 2}
    assert choose_path("measure", key, ["grouped_mm", "blocked"], near.get) == "grouped_mm"
    far = {"grouped_mm": 1.0, "blocked": 1.0 - 2 * expert_paths.SWITCH_MARGIN}
    assert choose_path("measure", key[:7] + (12, 1), ["grouped_mm", "blocked"], far.get) == "blocked"


def test_auto_is_a_rule_of_rows_per_expert_and_never_times(empty_cache, caplog):
    def never(path):
        raise AssertionError("auto must not time")

    rows = expert_paths.BLOCKED_MIN_ROWS_PER_EXPERT
    for num_experts in (8, 128):
        bucket = (rows * num_experts).bit_length() - 1      # log2 of the smallest row count that qualifies
        many = ("cpu", "float32", num_experts, 256, 512, True, True, bucket, 1)
        few = many[:7] + (bucket - 1, 1)
        with caplog.at_level(logging.INFO, logger="anyexperts.moe.expert_paths"):
            assert choose_path("auto", many, ["grouped_mm", "loop", "blocked"], never) == "blocked"
            assert choose_path("auto", few, ["grouped_mm", "loop", "blocked"], never) == "grouped_mm"
            assert choose_path("auto", few[:1] + ("float16",) + few[2:], ["loop"], never) == "loop"
    assert any("rule: blocked from" in r.getMessage() for r in caplog.records)


def test_a_forced_path_is_not_timed_and_an_unavailable_one_is_refused(empty_cache):
    def never(path):
        raise AssertionError("a forced path must not be timed")

    assert choose_path("loop", ("k",), ["grouped_mm", "loop", "blocked"], never) == "loop"
    with pytest.raises(ValueError, match="expert_path='blocked' cannot run this layer.*use expert_path=auto"):
        choose_path("blocked", ("k",), ["grouped_mm", "loop"], never)


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4, ffn_hidden_size=12,
                  moe_ffn_hidden_size=12, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  use_cpu_initialization=True, params_dtype=torch.float32)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def test_grouped_experts_measure_times_without_touching_grads_or_the_global_rng(empty_cache):
    from anyexperts.moe.experts import GroupedExperts

    experts = GroupedExperts(4, _config(), expert_path="measure")
    x, p = torch.randn(40, 8, requires_grad=True), torch.rand(40, requires_grad=True)
    state = torch.get_rng_state()
    out, _ = experts(x, [10, 10, 0, 20], p)
    assert torch.equal(torch.get_rng_state(), state)
    assert experts.last_path in ("grouped_mm", "loop", "blocked")
    assert all(w.grad is None for w in experts.parameters()) and x.grad is None
    (timed,) = expert_paths.cached_choices().values()
    assert set(timed[1]) == {"grouped_mm", "loop", "blocked"}
    # GELU experts cannot take the blocked path: it is neither timed nor accepted.
    gelu = GroupedExperts(4, _config(gated_linear_unit=False, activation_func=F.gelu), expert_path="blocked")
    with pytest.raises(ValueError, match="expert_path='blocked'"):
        gelu(x, [10, 10, 0, 20], p)
    with pytest.raises(ValueError, match="expert_path='fast' must be one of auto, measure, grouped_mm, loop, blocked"):
        GroupedExperts(4, _config(), expert_path="fast")


def test_config_names_the_field_of_a_bad_expert_path():
    from anyexperts.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.moe.expert_path = "fastest"
    with pytest.raises(ValueError, match="moe.expert_path='fastest' is not supported; choose one of auto"):
        validate(cfg, world_size=1)


def test_auto_logs_a_shape_again_only_where_its_path_changes(empty_cache, caplog):
    rows = expert_paths.BLOCKED_MIN_ROWS_PER_EXPERT
    blocked_from = (rows * 8).bit_length() - 1
    base = ("cpu", "float32", 8, 256, 512, True, True)
    with caplog.at_level(logging.INFO, logger="anyexperts.moe.expert_paths"):
        picked = [choose_path("auto", base + (bucket, 1), ["grouped_mm", "loop", "blocked"], None)
                  for bucket in range(blocked_from - 3, blocked_from + 3)]
        # Another thread count is another shape: logged on its own.
        choose_path("auto", base + (blocked_from, 2), ["grouped_mm", "loop", "blocked"], None)
    assert picked == ["grouped_mm"] * 3 + ["blocked"] * 3
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(messages) == 3, messages
    assert messages[0].endswith(")") and ": grouped_mm (" in messages[0] and ": blocked (" in messages[1]
    assert "2 threads: blocked" in messages[2]
    # Every bucket is still cached with its own choice.
    assert len(expert_paths.cached_choices()) == 7
