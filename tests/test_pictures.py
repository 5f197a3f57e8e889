"""The run pictures (anyexperts/training/pictures.py, tools/plot_run.py) on a synthetic run
directory and trace, and the trainer's end-of-run drawing on a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyexperts.moe.trace import save_trace
from anyexperts.training import pictures

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRACE_PICTURES = ["k_histogram.png", "text_allocation.png", "real_experts_by_class.png"]
ALL_PICTURES = ["loss_curves.png", "tokens_per_expert.png", *TRACE_PICTURES]

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2


def _record(layer: int, *, seq_length: int = 40, batch: int = 2, num_experts: int = 4, k_max: int = 3,
            importance: bool = True) -> dict:
    generator = torch.Generator().manual_seed(layer)
    tokens_SB = torch.tensor(list(TEXT[:seq_length * batch])).reshape(batch, seq_length).t()
    tokens = tokens_SB.reshape(-1)
    k = torch.randint(1, k_max + 1, (tokens.numel(),), generator=generator)
    slots = torch.arange(k_max)
    used = slots < k[:, None]
    expert_ids = torch.where(used, torch.randint(0, num_experts + 2, (tokens.numel(), k_max), generator=generator), -1)
    record = {
        "layer_number": layer, "num_experts": num_experts, "seq_length": seq_length, "tokens": tokens, "k": k,
        "expert_ids": expert_ids, "virtual_mask": expert_ids >= num_experts,
        "dropped_mask": used & (expert_ids < num_experts) & (torch.rand(expert_ids.shape, generator=generator) < 0.1),
        "gates": torch.rand(expert_ids.shape, generator=generator),
    }
    if importance:
        record["importance"] = torch.rand(tokens.numel(), generator=generator)
    return record


def _run_dir(root: Path, name: str = "run", *, importance: bool = True, loss_offset: float = 0.0) -> Path:
    run = root / name
    (run / "routing_traces").mkdir(parents=True)
    records = []
    for step in range(1, 21):
        record = {"step": step, "loss": 5.0 - 0.1 * step + loss_offset}
        if step % 5 == 0:
            record["val_loss"] = 5.2 - 0.1 * step + loss_offset
        for layer in (1, 2):
            record[f"moe/tokens_per_expert/layer{layer}"] = [float(step + e * layer) for e in range(4)]
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_trace([_record(1, importance=importance), _record(2, importance=importance)],
               run / "routing_traces" / "step_0000020_rank0.npz")
    return run


def _assert_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


@pytest.mark.parametrize("importance", [True, False], ids=["anyexperts", "no_importance"])
def test_every_picture_is_a_png(tmp_path, importance):
    run = _run_dir(tmp_path, importance=importance)
    written, skipped = pictures.draw_run_pictures([run], tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(ALL_PICTURES) and skipped == []
    _assert_pngs(tmp_path / "out", ALL_PICTURES)


def test_each_drawing_function_writes_its_png(tmp_path):
    run = _run_dir(tmp_path)
    trace = pictures.load_trace(pictures.latest_trace(run))
    records = pictures.read_metrics(run)
    pictures.draw_loss_curves({"a": records}, tmp_path / "loss.png")
    pictures.draw_tokens_per_expert(records, tmp_path / "load.png")
    pictures.draw_k_histogram(trace, tmp_path / "k.png")
    pictures.draw_text_allocation(trace, tmp_path / "text.png", max_chars=32, columns=16)
    pictures.draw_real_experts_by_class(trace, tmp_path / "classes.png")
    _assert_pngs(tmp_path, ["loss.png", "load.png", "k.png", "text.png", "classes.png"])


def test_missing_data_is_skipped_with_a_reason(tmp_path):
    run = _run_dir(tmp_path)
    for trace in (run / "routing_traces").iterdir():
        trace.unlink()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    written, skipped = pictures.draw_run_pictures([run], tmp_path / "out")
    assert [p.name for p in written] == ["loss_curves.png"]
    assert sorted(line.split(":")[0] for line in skipped) == sorted(ALL_PICTURES[1:])
    assert any("routing_trace_at_end" in line for line in skipped)


def test_trace_without_tokens_skips_the_text_pictures(tmp_path):
    record = _record(1)
    del record["tokens"]
    path = save_trace([record], tmp_path / "trace.npz")
    written, skipped = pictures.draw_trace_pictures(path, tmp_path / "out")
    assert [p.name for p in written] == ["k_histogram.png"]
    assert [line.split(":")[0] for line in skipped] == TRACE_PICTURES[1:]


def test_an_empty_trace_is_skipped_with_a_reason(tmp_path):
    path = save_trace([], tmp_path / "trace.npz")
    written, skipped = pictures.draw_trace_pictures(path, tmp_path / "out")
    assert written == [] and len(skipped) == 3 and all("no layer records" in line for line in skipped)


def _plot_run(*args: str) -> subprocess.CompletedProcess:
    # A script's own folder heads sys.path: the checkout under test must come before any installed copy.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_compares_runs_and_draws_each(tmp_path):
    a, b = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b", importance=False, loss_offset=0.3)
    proc = _plot_run(str(a), str(b), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    expected = ["loss_curves.png"] + [f"{run}_{name}" for run in "ab" for name in ALL_PICTURES[1:]]
    assert sorted(line.split()[-1] for line in proc.stdout.splitlines()) == sorted(
        str(tmp_path / "out" / name) for name in expected)
    _assert_pngs(tmp_path / "out", expected)


def test_cli_on_a_trace_and_on_a_missing_path(tmp_path):
    run = _run_dir(tmp_path)
    proc = _plot_run(str(pictures.latest_trace(run)), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    _assert_pngs(tmp_path / "out", TRACE_PICTURES)
    proc = _plot_run(str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_a_drawing_failure_is_printed_not_raised(tmp_path):
    run = _run_dir(tmp_path)
    (run / "pictures").write_text("a file where the folder would go")
    messages: list[str] = []
    assert pictures.draw_pictures_at_end(run, messages.append) == []
    assert len(messages) == 1 and messages[0].startswith("pictures not drawn: ")


def _tiny_run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    from tests.test_train_e2e import COMMON, _run

    return _run([sys.executable, "-m", "launcher.train", *COMMON, "parallel.expert_model_parallel_size=1",
                 "trainer.max_steps=4", "trainer.pictures_at_end=true", *overrides, f"experiment.run_dir={run_dir}"],
                timeout=300)


@pytest.mark.slow
def test_the_main_job_draws_its_pictures_at_the_end(tmp_path):
    run = tmp_path / "run"
    proc = _tiny_run(run)
    printed = sorted(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("picture: "))
    assert printed == sorted(str(run / "pictures" / name) for name in ALL_PICTURES)
    _assert_pngs(run / "pictures", ALL_PICTURES)


@pytest.mark.slow
def test_a_drawing_failure_does_not_fail_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pictures").write_text("a file where the folder would go")
    proc = _tiny_run(run, "trainer.max_steps=2", "trainer.eval_interval=2")
    assert "pictures not drawn: " in proc.stdout
    assert "done: 2 steps" in proc.stdout
