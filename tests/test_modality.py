"""The modality channel: TokenInfo around a forward, per-modality statistics that average
back to the overall ones, per-modality budget targets and their validation. One process,
no spawn (singleton process groups).

    OMP_NUM_THREADS=1 python -m pytest tests/test_modality.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anyexperts.moe import stats, token_info
from anyexperts.moe.config import AnyExpertsConfig
from anyexperts.moe.token_info import TokenInfo
from tests.test_anyexperts_layer import build_layer, no_process_groups, transformer_config

SEQ, BATCH, HIDDEN = 10, 3, 16
AE = AnyExpertsConfig(k_min=1, k_max=4, k_rounding="straight_through", num_virtual_experts=1, rho_max=0.5,
                      importance_logit_std=2.0, budget_coeff=0.5, budget_target_by_modality={"image": 1.5, "text": 3.5})


def layer_and_batch(ae: AnyExpertsConfig = AE):
    torch.manual_seed(3)
    layer = build_layer(transformer_config(num_moe_experts=4, hidden_size=HIDDEN), ae, pg_collection=no_process_groups())
    with torch.no_grad():
        for param in layer.parameters():
            param.mul_(8.0)  # a less uniform routing: K varies between tokens
    hidden_SBH = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    tokens_BS = torch.randint(0, 300, (BATCH, SEQ))
    return layer, hidden_SBH, tokens_BS


def image_if_large(tokens):
    return (tokens >= 150).to(torch.int64)


def test_per_modality_statistics_sum_to_the_overall_ones():
    layer, hidden_SBH, tokens_BS = layer_and_batch()
    layer.train()
    with stats.separate_sink() as sink:
        for _ in range(2):  # two forwards of the same size, as micro-batches are
            with token_info.use(TokenInfo.from_tokens(tokens_BS, image_if_large)):
                layer(hidden_SBH)
        out = sink.collect()
    n = {m: float(out[f"modality_tokens/{m}"][1]) for m in ("text", "image")}
    is_image = image_if_large(tokens_BS)
    assert n["image"] == 2 * is_image.sum() and n["text"] == 2 * (1 - is_image).sum()
    for name in ("real_experts_per_token", "virtual_experts_per_token", "slots_per_token", "importance_mean"):
        weighted = sum(n[m] * float(out[f"{name}/{m}"][1]) for m in n) / sum(n.values())
        assert weighted == pytest.approx(float(out[name][1]), rel=1e-6), name
    assert torch.equal(out["k_histogram/text"][1] + out["k_histogram/image"][1], out["k_histogram"][1])
    # Not a trivial split: K differs between tokens.
    assert (out["k_histogram"][1] > 0).sum() > 1


def test_modality_lines_up_with_the_layer_rows():
    tokens_BS = torch.arange(6).view(2, 3)
    info = TokenInfo.from_tokens(tokens_BS, lambda t: t % 2)
    # Rows s * B + b: tokens (b=0,s=0), (b=1,s=0), (b=0,s=1), ...
    assert info.modality_T.tolist() == [0, 1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="needs whole sequences on each rank"):
        info.modality_for(5, torch.device("cpu"))
    with pytest.raises(ValueError, match="one modality index per token"):
        TokenInfo.from_tokens(tokens_BS, lambda t: t[:, :1])


def test_attach_sets_the_info_for_each_forward_only():
    seen = []

    class Model(torch.nn.Module):
        def forward(self, input_ids, position_ids=None, fail=False):
            seen.append(token_info.current())
            if fail:
                raise RuntimeError("boom")
            return input_ids

    model = Model()
    handles = token_info.attach(model, image_if_large)
    model(torch.tensor([[1, 200]]))
    model(input_ids=torch.tensor([[200, 1, 1]]))
    assert [info.modality_T.tolist() for info in seen] == [[0, 1], [1, 0, 0]]
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.tensor([[1]]), fail=True)
    assert token_info.current() is None  # popped even when the forward raised
    for handle in handles:
        handle.remove()


def test_budget_by_modality_pushes_each_modality_to_its_own_target():
    from anyexperts.moe.losses import AuxLossTerms

    ae = dataclasses.replace(AE, load_balance_coeff=0.0, z_loss_coeff=0.0, budget_on_virtual=False)
    terms = AuxLossTerms(ae, num_experts=4)
    modality_T = torch.tensor([0, 0, 1, 1, 1, 0])
    num_real_T = torch.tensor([2, 3, 3, 2, 1, 4])
    importance_T = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)
    aux = terms(logits_TX=torch.zeros(6, 5, dtype=torch.float64), real_expert_TK=torch.zeros(6, 4, dtype=torch.long),
                importance_T=importance_T, num_real_counted_T=num_real_T,
                token_info=TokenInfo(modality_T=modality_T))
    aux.attached.backward()
    span = ae.k_max - ae.k_min
    deviation = {0: (3.0 - 3.5) / span, 1: (2.0 - 1.5) / span}  # text mean 3 vs 3.5, image mean 2 vs 1.5
    expected = torch.tensor([ae.budget_coeff * 2 * deviation[int(m)] / 6 for m in modality_T], dtype=torch.float64)
    torch.testing.assert_close(importance_T.grad, expected)
    # Image tokens over budget are pushed down (positive gradient), text tokens under it up.
    assert (importance_T.grad[modality_T == 1] > 0).all() and (importance_T.grad[modality_T == 0] < 0).all()
    assert float(aux.budget) == pytest.approx(0.5 * deviation[0] ** 2 + 0.5 * deviation[1] ** 2)
    with pytest.raises(ValueError, match="needs the modality of every token"):
        terms(logits_TX=torch.zeros(6, 5, dtype=torch.float64), real_expert_TK=torch.zeros(6, 4, dtype=torch.long),
              importance_T=importance_T, num_real_counted_T=num_real_T)


def test_a_layer_trains_its_modalities_apart():
    """Through the whole layer: the per-modality budget's gradient reaches the importance MLP."""
    layer, hidden_SBH, tokens_BS = layer_and_batch()
    layer.train()
    with stats.separate_sink(), token_info.use(TokenInfo.from_tokens(tokens_BS, image_if_large)):
        out, _ = layer(hidden_SBH)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.importance.parameters()
               if p.requires_grad)


@pytest.mark.parametrize("overrides, message", [
    (dict(budget_target_by_modality={"audio": 2.0}), "names modality 'audio'"),
    (dict(budget_target_by_modality={"image": 9.0}), "outside \\[k_min=1, k_max=4\\]"),
    (dict(budget_target_by_modality={"image": "low"}), "not a number"),
    (dict(budget_target_by_modality=[1.4]), "must map modality names to targets"),
    (dict(budget_coeff=0.0), "needs budget_coeff > 0"),
    (dict(budget_scope="global_batch"), "budget_scope='micro_batch' only"),
    (dict(budget_bias_rate=0.5, budget_target=2.0), "set budget_bias_rate=0"),
    (dict(k_min=2, k_max=2, budget_target_by_modality={"image": 2.0}), "needs a range of K"),
])
def test_budget_by_modality_is_validated_naming_the_field(overrides, message):
    ae = dataclasses.replace(AE, **overrides)
    with pytest.raises(ValueError, match=f"moe.anyexperts.budget_target_by_modality=.*{message}"):
        ae.validate(num_experts=4, prefix="moe.anyexperts.")
