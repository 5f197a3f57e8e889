"""data=digits: scikit-learn's bundled 8x8 digits as image tokens + caption, prepared into
megatron indexed data; modalities from token ids line up after packing; clear errors.

    .venv/bin/python -m pytest -q tests/test_digits.py
"""

from __future__ import annotations

import json
import types

import numpy
import pytest
import torch

from anyexperts.data import digits
from anyexperts.data.datasets import build_gpt_datasets
from anyexperts.data.prepare import ensure_prepared
from anyexperts.moe.token_info import MODALITY_NAMES, TokenInfo

sklearn = pytest.importorskip("sklearn")


def data_cfg(tmp_path, **overrides):
    fields = dict(source="digits", input_path=None, data_prefix=None, jsonl_field="text", cache_dir=str(tmp_path),
                  tokenizer="byte", tokenizer_path=None, bpe_vocab_size=300, split="90,10,0")
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    prefix, tokenizer = ensure_prepared(data_cfg(cache), show_progress=False)
    return prefix, tokenizer


def test_corpus_builds_from_bundled_digits(prepared):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, tokenizer = prepared
    images, labels = digits.load_digits_arrays()
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 1797 == len(labels)
    order = numpy.random.default_rng(digits.SHUFFLE_SEED).permutation(len(labels))
    for document_index in (0, 1, 1796):
        tokens = dataset[document_index].astype(numpy.int64)
        image_index = order[document_index]
        assert len(tokens) == 74
        assert tokens[0] == digits.BEGIN_IMAGE and tokens[65] == digits.END_IMAGE
        numpy.testing.assert_array_equal(tokens[1:65] - digits.PIXEL_BASE, images[image_index].reshape(-1))
        assert tokenizer.detokenize(tokens[66:]) == f"digit {labels[image_index]}<|endoftext|>"
    assert tokenizer.vocab_size == digits.VOCAB_SIZE == 276
    info = json.loads(open(f"{prefix}.info.json").read())
    assert info["source"] == "sklearn.datasets.load_digits" and info["num_tokens"] == 1797 * 74
    assert info["tokenizer"]["class"].endswith("DigitsTokenizer")
    # A second call reuses the files.
    again, _ = ensure_prepared(data_cfg(prefix.rsplit("/prepared/", 1)[0]), show_progress=False)
    assert again == prefix


def test_split_is_by_image_and_modalities_line_up_after_packing(prepared):
    prefix, tokenizer = prepared
    train, valid, _ = build_gpt_datasets(prefix, tokenizer, seq_length=100, split="90,10,0", seed=3,
                                         num_samples=(64, 16, 0))
    # 90% of 1,797 documents (megatron rounds the bookends): no image is in both splits.
    assert train.indices.max() < 1617 <= valid.indices.min()
    batch = torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(4)])
    info = TokenInfo.from_tokens(batch, digits.modality_of_tokens)
    modality_BS = info.modality_T.view(batch.shape[1], batch.shape[0]).t()
    is_image_BS = (batch >= digits.PIXEL_BASE)
    assert torch.equal(modality_BS == MODALITY_NAMES.index("image"), is_image_BS)
    assert torch.equal(modality_BS == MODALITY_NAMES.index("text"), ~is_image_BS)
    # Samples cross documents: both modalities in every 100-token sample, about 66:8 image to text.
    assert is_image_BS.any(1).all() and (~is_image_BS).any(1).all()
    share = is_image_BS.float().mean().item()
    assert 0.75 < share < 0.95


def test_caption_positions_find_the_prefix_before_each_digit(prepared):
    prefix, tokenizer = prepared
    images, labels = digits.load_digits_arrays()
    sample = tokenizer.tokenize_sample(images[0], labels[0]) + tokenizer.tokenize_sample(images[1], labels[1])
    tokens_BS = torch.tensor([sample])
    where = digits.caption_positions(tokens_BS)[0].nonzero().flatten().tolist()
    assert [tokens_BS[0, s + 1].item() for s in where] == [ord(str(labels[0])), ord(str(labels[1]))]
    # Cut inside the prefix: that caption is skipped, not misread.
    assert digits.caption_positions(tokens_BS[:, 70:])[0].sum() == 1


def test_bad_input_gives_clear_errors(tmp_path):
    images, labels = digits.load_digits_arrays()
    prefix = tmp_path / "d" / "text_document"
    with pytest.raises(ValueError, match="grey levels 4..20, outside 0..16"):
        digits.prepare_digits(prefix, images=numpy.clip(images + 4, 0, 20), labels=labels)
    with pytest.raises(ValueError, match="must be \\[N, 8, 8\\]"):
        digits.prepare_digits(prefix, images=images.reshape(-1, 4, 16), labels=labels)
    with pytest.raises(ValueError, match="one label per image"):
        digits.prepare_digits(prefix, images=images, labels=labels[:-1])
    with pytest.raises(ValueError, match="labels must be integers 0..9"):
        digits.prepare_digits(prefix, images=images, labels=labels + 5)
    with pytest.raises(ValueError, match="whole grey levels"):
        digits.prepare_digits(prefix, images=images + 0.5, labels=labels)
    with pytest.raises(ValueError, match="both images and labels"):
        digits.prepare_digits(prefix, images=images)
    with pytest.raises(ValueError, match="leave data.tokenizer=byte"):
        ensure_prepared(data_cfg(tmp_path, tokenizer="bpe"), show_progress=False)
    # Inputs are checked before anything is written.
    assert not (tmp_path / "d").exists()


def test_missing_scikit_learn_names_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits.load_digits_arrays()


def test_custom_arrays_prepare_and_flat_images_are_accepted(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    images = numpy.arange(3 * 64).reshape(3, 64) % 17
    stats = digits.prepare_digits(tmp_path / "x" / "text_document", images=images, labels=[1, 2, 3])
    assert stats.num_documents == 3 and stats.num_tokens == 3 * 74
    assert len(IndexedDataset(stats.output_prefix)) == 3


def test_config_refuses_modality_budgets_without_modalities_and_other_tokenizers():
    from anyexperts.config import to_dataclass, validate
    from tests.test_config import compose_cfg

    budget = "moe.anyexperts.budget_target_by_modality={image: 1.4, text: 2.2}"
    cfg = to_dataclass(compose_cfg("experiment=digits_cpu", budget, "moe.anyexperts.budget_bias_rate=0"))
    validate(cfg, world_size=2)
    assert cfg.moe.anyexperts.budget_target_by_modality == {"image": 1.4, "text": 2.2}
    with pytest.raises(ValueError, match="data.source='shakespeare' is text only"):
        validate(to_dataclass(compose_cfg("experiment=digits_cpu", budget, "moe.anyexperts.budget_bias_rate=0",
                                          "data=shakespeare")), world_size=2)
    with pytest.raises(ValueError, match="budget_target_by_modality=.*set budget_bias_rate=0"):
        validate(to_dataclass(compose_cfg("experiment=digits_cpu", budget)), world_size=2)
    with pytest.raises(ValueError, match="data.tokenizer='bpe'.*leave data.tokenizer=byte"):
        validate(to_dataclass(compose_cfg("experiment=digits_cpu", "data.tokenizer=bpe")), world_size=2)


def test_bench_digits_reads_runs_into_per_modality_rows(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_digits

    def write(run_dir, record):
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps(record) + "\n")

    final = {"step": 10, "loss": 2.0, "val_loss": 1.5, "caption_accuracy": 0.5, "caption_loss": 1.0,
             "moe/real_experts_per_token/layer1": 2.0, "moe/real_experts_per_token/layer2": 2.0,
             "moe/real_experts_per_token/image/layer1": 1.8, "moe/real_experts_per_token/image/layer2": 1.6,
             "moe/real_experts_per_token/text/layer1": 2.9, "moe/real_experts_per_token/text/layer2": 3.0}
    write(tmp_path / "a_s0", final)
    write(tmp_path / "top_s0", {"step": 10, "loss": 2.0, "val_loss": 1.6, "caption_accuracy": 0.4,
                                "moe/real_experts_per_token/layer1": 2.0})
    row = bench_digits.extract_run(tmp_path / "a_s0", 10, topk=None)
    assert row["real_image"] == pytest.approx(1.7) and row["real_text"] == pytest.approx(2.95)
    assert row["caption_accuracy"] == 0.5 and "trace_real_ink_pixels" not in row
    top = bench_digits.extract_run(tmp_path / "top_s0", 10, topk=2)
    # megatron's top-k computes k for every token: its split is k by construction.
    assert top["real_image"] == top["real_text"] == top["trace_real_background_pixels"] == 2.0
    aggregated = bench_digits.aggregate("top2", [{"seed": 0, **top}, {"seed": 1, **top}])
    assert aggregated["caption_accuracy"]["mean"] == pytest.approx(0.4) and aggregated["seeds"] == [0, 1]
    bench_digits.print_table([aggregated])
    assert "0.400 ± 0.000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no validation record at step 20"):
        bench_digits.extract_run(tmp_path / "a_s0", 20, topk=None)


def test_digit_picture_and_pixel_summary_from_a_trace(tmp_path):
    from anyexperts.training.digit_pictures import complete_images, draw_digit_allocation, pixel_allocation_summary

    tokenizer = digits.DigitsTokenizer()
    images, labels = digits.load_digits_arrays()
    sample = tokenizer.tokenize_sample(images[0], labels[0]) + tokenizer.tokenize_sample(images[1], labels[1])
    tokens_BS = torch.tensor([sample[:100], sample[40:140]])  # the second row holds only one whole image
    batch, seq = tokens_BS.shape
    assert [(b, s) for b, s in complete_images(tokens_BS)] == [(0, 0), (1, 34)]
    tokens_T = tokens_BS.t().reshape(-1)
    background_T = tokens_T == digits.PIXEL_BASE
    # Two real experts on background pixels, three on everything else; one slot column more, unused.
    expert_ids_TK = torch.tensor([0, 1, 2, -1]).repeat(len(tokens_T), 1)
    expert_ids_TK[background_T, 2] = 4  # a virtual entry (E = 4)
    record = dict(layer_number=1, tokens=tokens_T, seq_length=seq, k=torch.full((len(tokens_T),), 3),
                  importance=background_T.float(), expert_ids=expert_ids_TK,
                  dropped_mask=torch.zeros(len(tokens_T), 4, dtype=torch.bool), num_experts=4)
    (summary,) = pixel_allocation_summary([record])
    assert summary == {"layer": 1, "background_pixels": 2.0, "ink_pixels": 3.0, "image_markers": 3.0, "text": 3.0}
    png = draw_digit_allocation([record], tmp_path / "digit_allocation.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no digit images"):
        draw_digit_allocation([dict(record, tokens=torch.zeros_like(tokens_T))], tmp_path / "none.png")
