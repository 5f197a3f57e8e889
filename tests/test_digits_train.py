"""A real data=digits run through the entry point (one process, a small model, 4 steps):
per-modality statistics and caption metrics in metrics.jsonl and TensorBoard, per-modality
budget targets from the command line, the digit picture at the end, a resume that
continues with the same statistics (modalities come from the token ids alone), and a
2-process run at expert-parallel size 2 with the same losses and per-modality statistics.

    OMP_NUM_THREADS=1 python -m pytest tests/test_digits_train.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import _run

pytest.importorskip("sklearn")

COMMON = ["experiment=digits_cpu", "parallel.expert_model_parallel_size=1", "model.num_layers=2",
          "model.hidden_size=64", "model.num_attention_heads=4", "moe.expert_ffn_hidden_size=64",
          "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_interval=2",
          "trainer.eval_iters=1", "logging.log_interval=1", "optim.warmup_steps=2",
          "moe.anyexperts.budget_bias_rate=0", "moe.anyexperts.budget_target_by_modality={image: 1.4, text: 2.2}"]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r and "loss" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    run_dir = root / "run"
    cache = f"data.cache_dir={root / 'cache'}"
    _run([sys.executable, "-m", "launcher.train", *COMMON, cache, "trainer.max_steps=4",
          f"experiment.run_dir={run_dir}", "checkpoint.interval=2"])
    # The same run resumed from its step-2 checkpoint: steps 3 and 4 again.
    resumed = root / "resumed"
    _run([sys.executable, "-m", "launcher.train", *COMMON, cache, "trainer.max_steps=4", "trainer.pictures_at_end=false",
          f"experiment.run_dir={resumed}", f"checkpoint.resume={run_dir / 'checkpoints' / 'step_0000002'}"])
    # Two processes at expert-parallel size 2 (data-parallel 2, one micro-batch each): the same
    # global batches as the one-process run's two micro-batches.
    ep2 = root / "ep2"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "launcher.train", *COMMON, cache, "trainer.max_steps=4", "parallel.expert_model_parallel_size=2",
          "trainer.pictures_at_end=false", "checkpoint.save_at_end=false", f"experiment.run_dir={ep2}"])
    return run_dir, resumed, ep2


def test_metrics_split_by_modality_and_caption_metrics(run):
    run_dir, *_ = run
    records = {r["step"]: r for r in _records(run_dir)}
    last = records[4]
    for layer in (1, 2):
        for modality in ("text", "image"):
            assert f"moe/real_experts_per_token/{modality}/layer{layer}" in last
            assert f"moe/importance_mean/{modality}/layer{layer}" in last
            assert len(last[f"moe/k_histogram/{modality}/layer{layer}"]) == 3  # K = 1..3
            assert f"moe/val_real_experts_per_token/{modality}/layer{layer}" in last
        n = {m: last[f"moe/modality_tokens/{m}/layer{layer}"] for m in ("text", "image")}
        weighted = sum(n[m] * last[f"moe/real_experts_per_token/{m}/layer{layer}"] for m in n) / sum(n.values())
        assert weighted == pytest.approx(last[f"moe/real_experts_per_token/layer{layer}"], rel=1e-5)
    for step in (2, 4):
        assert 0.0 <= records[step]["caption_accuracy"] <= 1.0
        assert records[step]["caption_loss"] > 0 and records[step]["caption_count"] > 0
    assert "caption_accuracy" not in records[1]  # validation steps only


def test_tensorboard_has_the_modality_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, *_ = run
    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"moe/real_experts_per_token/image/layer1", "moe/real_experts_per_token/text/layer2",
            "caption_accuracy", "caption_loss"} <= tags
    assert "moe/k_histogram/image/layer1" in set(events.Tags()["histograms"])


def test_the_digit_picture_is_drawn_at_the_end(run):
    run_dir, *_ = run
    png = run_dir / "pictures" / "digit_allocation.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_with_the_same_modality_statistics(run):
    run_dir, resumed, _ = run
    original = {r["step"]: r for r in _records(run_dir)}
    again = {r["step"]: r for r in _records(resumed)}
    assert sorted(again) == [3, 4]
    for key in ("loss", "moe/real_experts_per_token/image/layer1", "moe/modality_tokens/text/layer2",
                "caption_accuracy"):
        assert again[4][key] == pytest.approx(original[4][key], rel=1e-5), key


def test_expert_parallel_run_equals_one_process_split_by_modality(run):
    run_dir, _, ep2 = run
    original = {r["step"]: r for r in _records(run_dir)}
    parallel = {r["step"]: r for r in _records(ep2)}
    assert sorted(parallel) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        keys = [k for k in original[step] if k.startswith(("moe/real_experts_per_token/", "moe/modality_tokens/",
                                                            "moe/importance_mean/"))]
        assert len(keys) >= 12
        for key in ["loss", *keys] + (["caption_loss", "val_loss", "caption_accuracy"] if step % 2 == 0 else []):
            assert parallel[step][key] == pytest.approx(original[step][key], rel=1e-5, abs=1e-6), (step, key)
