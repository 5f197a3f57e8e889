"""Checkpoint files, resume selection, damage detection, exact state round trip, stop signals.

Fast tests work on fake checkpoint directories (no torch.distributed). One spawned
2-process job (EP=2, gloo, about 30 s on 2 busy cores) saves a real megatron
dist_checkpointing checkpoint and checks in it: model, Adam moments and step, scheduler,
step/consumed_samples and RNG come back exactly; a truncated shard, a missing shard, a
truncated shard whose manifest (size and checksum) was rewritten to match, a model config with another shape
and a vocabulary of another size each fail on every rank with the checkpoint path in the
message; one rank's real SIGTERM stops every rank.

    pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from anyexperts.config import TrainConfig, validate
from anyexperts.training import checkpoint as ckpt
from anyexperts.training import checkpoint_files as files
from anyexperts.training.signals import StopSignal


def _fake_checkpoint(root: Path, step: int, *, complete: bool = True, payload: bytes = b"x" * 100) -> Path:
    name = files.step_dir_name(step) + ("" if complete else files.TMP_SUFFIX)
    path = root / name
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(payload)
    (path / "common.pt").write_bytes(b"common")
    if complete:
        files.write_manifest(path, {"step": step})
    return path


def test_latest_marker_wins_and_partial_saves_are_never_latest(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # a save cut short: step_0000006.tmp
    (tmp_path / files.LATEST_MARKER).write_text(four.name + "\n")
    assert files.find_latest(tmp_path) == four
    # A step_* directory without manifest (renamed by hand, or an old crash) is not complete either.
    unfinished = tmp_path / files.step_dir_name(8)
    unfinished.mkdir()
    assert files.find_latest(tmp_path) == four
    assert [p.name for p in files.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000004"]


def test_without_marker_the_highest_complete_step_is_latest(tmp_path):
    _fake_checkpoint(tmp_path, 12)
    _fake_checkpoint(tmp_path, 9)
    _fake_checkpoint(tmp_path, 15, complete=False)
    assert files.find_latest(tmp_path).name == "step_0000012"
    # A marker naming a deleted checkpoint falls back to the same rule.
    (tmp_path / files.LATEST_MARKER).write_text("step_0000099\n")
    assert files.find_latest(tmp_path).name == "step_0000012"


def test_resolve_resume_modes(tmp_path):
    assert files.resolve_resume("auto", tmp_path / "none-yet") is None
    assert files.resolve_resume("none", tmp_path) is None
    three = _fake_checkpoint(tmp_path, 3)
    five = _fake_checkpoint(tmp_path, 5)
    assert files.resolve_resume("auto", tmp_path) == five
    assert files.resolve_resume(str(three), tmp_path / "elsewhere") == three
    assert files.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == five  # a checkpoints dir: its latest
    # The run's own checkpoints win over the path it started from (a requeued job goes on).
    assert files.resolve_resume(str(three), tmp_path) == five
    partial = _fake_checkpoint(tmp_path, 7, complete=False)
    with pytest.raises(RuntimeError, match="unfinished checkpoint"):
        files.resolve_resume(str(partial), tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="is not a checkpoint"):
        files.resolve_resume(str(tmp_path / "missing"), tmp_path / "elsewhere")


def test_prune_keeps_the_newest_and_removes_stale_tmp(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, complete=False)
    files.prune(tmp_path, keep_last=2, keep=tmp_path / "step_0000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000004"]
    files.prune(tmp_path, keep_last=0, keep=tmp_path / "step_0000004")  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 2


def test_verify_files_reports_truncated_and_missing_files(tmp_path):
    path = _fake_checkpoint(tmp_path, 1)
    assert files.verify_files(path) == []
    with open(path / "__0_0.distcp", "r+b") as f:
        f.truncate(10)
    (path / "common.pt").unlink()
    problems = files.verify_files(path)
    assert any("__0_0.distcp has 10 bytes, 100 were written" in p for p in problems), problems
    assert any("common.pt is missing" in p for p in problems), problems
    (path / files.MANIFEST).unlink()
    assert "did not finish" in files.verify_files(path)[0]


@pytest.mark.parametrize("field, value, message", [
    ("keep_last", -1, "checkpoint.keep_last=-1"),
    ("interval", -5, "checkpoint.interval=-5"),
    ("resume", "", "checkpoint.resume is empty"),
    ("distributed_optimizer_format", "zero", "checkpoint.distributed_optimizer_format"),
])
def test_checkpoint_config_errors_name_the_field(field, value, message):
    cfg = TrainConfig()
    setattr(cfg.checkpoint, field, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=1)


def test_eval_only_needs_a_checkpoint_to_evaluate():
    cfg = TrainConfig()
    cfg.trainer.eval_only = True
    cfg.checkpoint.resume = "none"
    with pytest.raises(ValueError, match="trainer.eval_only=true"):
        validate(cfg, world_size=1)


def test_stop_signal_handler_only_records_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal.install()
    try:
        assert stop.received == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing and does not exit
        assert stop.received == signal.SIGUSR1
        assert stop.agreed() == signal.SIGUSR1  # no process group: the local flag
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


# --------------------------------------------------------------------------------------------
# One real 2-process job (EP=2): exact round trip, damaged and incompatible checkpoints.

def _tiny_cfg(**model_overrides) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.num_layers = 2
    cfg.model.hidden_size = 64
    cfg.model.seq_length = 32
    cfg.moe.num_experts = 4
    cfg.moe.expert_ffn_hidden_size = 32
    cfg.parallel.expert_model_parallel_size = 2
    cfg.optim.warmup_steps = 1
    cfg.trainer.max_steps = 10
    cfg.checkpoint.keep_last = 0
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg


def _build(cfg: TrainConfig, vocab_size: int = 256):
    from anyexperts.model import build_model
    from anyexperts.training.optim import build_optimizer, build_scheduler, wrap_ddp

    model = build_model(cfg, vocab_size)
    ddp = wrap_ddp(cfg, model)
    optimizer = build_optimizer(cfg, ddp)
    return model, ddp, optimizer, build_scheduler(cfg, optimizer)


def _train_steps(cfg, ddp, optimizer, scheduler, num_steps: int, seed: int) -> None:
    import torch
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    for _ in range(num_steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, 256, (2, cfg.model.seq_length), generator=generator)
        positions = torch.arange(cfg.model.seq_length).expand(2, -1)
        ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
        scheduler.step(increment=1)


def _adam_state(optimizer) -> dict:
    state = {}
    for sub, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for group_index, group in enumerate(opt.optimizer.param_groups):
            for index, param in enumerate(group["params"]):
                for key, value in opt.optimizer.state.get(param, {}).items():
                    state[(sub, group_index, index, key)] = value.clone()
    return state


def _expect_failure(fn, *needles) -> str:
    try:
        fn()
    except RuntimeError as err:
        message = str(err)
        missing = [n for n in needles if n not in message]
        return f"message lacks {missing}: {message}" if missing else "ok"
    return "no error raised"


def _round_trip_and_damage(rank, world_size, root):
    import torch
    import torch.distributed as dist

    from anyexperts.training.trainer import TrainState, setup_parallel

    root = Path(root)
    cfg = _tiny_cfg()
    setup_parallel(cfg)
    model, ddp, optimizer, scheduler = _build(cfg)
    _train_steps(cfg, ddp, optimizer, scheduler, num_steps=2, seed=7)
    checkpointer = ckpt.Checkpointer(cfg, root)
    state = TrainState(step=2, consumed_samples=32)
    info = checkpointer.save(model, optimizer, scheduler, state)
    saved_params = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    saved_adam = _adam_state(optimizer)
    saved_lr = optimizer.param_groups[0]["lr"]
    draws_after_save = torch.rand(4)  # the load must bring the RNG back to before this draw
    results = {"num_bytes": info.num_bytes, "path": str(info.path)}

    # A fresh model with other weights (another seed) and an optimizer at another step.
    cfg_other = _tiny_cfg()
    cfg_other.trainer.seed = 99
    model2, ddp2, optimizer2, scheduler2 = _build(cfg_other)
    _train_steps(cfg_other, ddp2, optimizer2, scheduler2, num_steps=1, seed=3)
    state2 = TrainState()
    loaded_from = ckpt.Checkpointer(cfg, root).resume(model2, optimizer2, scheduler2, state2)
    results["loaded_from"] = str(loaded_from)
    results["state"] = (state2.step, state2.consumed_samples)
    results["params_equal"] = all(torch.equal(saved_params[k], v) for k, v in model2.state_dict().items()
                                  if isinstance(v, torch.Tensor))
    loaded_adam = _adam_state(optimizer2)
    results["adam_keys_equal"] = sorted(saved_adam) == sorted(loaded_adam) and len(saved_adam) > 0
    results["adam_equal"] = results["adam_keys_equal"] and all(
        torch.equal(torch.as_tensor(saved_adam[k]), torch.as_tensor(loaded_adam[k])) for k in saved_adam)
    results["lr_equal"] = optimizer2.param_groups[0]["lr"] == saved_lr
    results["scheduler_steps"] = scheduler2.num_steps
    results["rng_equal"] = torch.equal(torch.rand(4), draws_after_save)

    # Damaged copies, made by rank 0 while the others wait.
    good = Path(info.path)
    cases = {name: root / "damaged" / name / good.name
             for name in ("truncated", "missing", "forged_manifest")}
    if rank == 0:
        for path in cases.values():
            shutil.copytree(good, path)
        shard = sorted(p.name for p in good.glob("*.distcp"))[-1]
        for name in ("truncated", "forged_manifest"):
            with open(cases[name] / shard, "r+b") as f:
                f.truncate((good / shard).stat().st_size // 2)
        (cases["missing"] / shard).unlink()
        manifest = json.loads((cases["forged_manifest"] / files.MANIFEST).read_text())
        manifest["files"][shard] = files.file_entries(cases["forged_manifest"], [shard])[shard]
        (cases["forged_manifest"] / files.MANIFEST).write_text(json.dumps(manifest))
        results["shard"] = shard
    dist.barrier()
    shard = [results.get("shard")]
    dist.broadcast_object_list(shard, src=0)

    def load_into_fresh(path, cfg_load, vocab_size=256):
        m, _, o, s = _build(cfg_load, vocab_size)
        ckpt.Checkpointer(cfg_load, root).load(path, m, o, s, TrainState())

    results["truncated"] = _expect_failure(lambda: load_into_fresh(cases["truncated"], cfg),
                                           str(cases["truncated"]), shard[0], "truncated")
    results["missing"] = _expect_failure(lambda: load_into_fresh(cases["missing"], cfg),
                                         str(cases["missing"]), f"{shard[0]} is missing")
    # The manifest's size and checksum agree with the truncated file: megatron's reader must still refuse it.
    results["forged_manifest"] = _expect_failure(lambda: load_into_fresh(cases["forged_manifest"], cfg),
                                                 str(cases["forged_manifest"]), "could not be read")
    results["wrong_shape"] = _expect_failure(lambda: load_into_fresh(good, _tiny_cfg(hidden_size=32)),
                                             str(good), "model.hidden_size=32 here but 64")
    # A tokenizer with another vocabulary changes the embedding shape without a config field.
    # (megatron itself would zero-pad the embedding to fit: allow_shape_mismatch.)
    results["wrong_vocab"] = _expect_failure(lambda: load_into_fresh(good, cfg, vocab_size=1000), str(good),
                                             "embedding.word_embeddings.weight is (256, 64) in the checkpoint "
                                             "but (1024, 64) in this model")

    # One rank's real SIGTERM stops both: rank 1 signals itself, both agree on it.
    stop = StopSignal.install()
    try:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        results["agreed"] = stop.agreed()
    finally:
        stop.restore()
    return results


def test_save_load_round_trip_damage_and_stop_agreement(tmp_path):
    from tests.distributed import run_distributed

    results = run_distributed(_round_trip_and_damage, 2, args=(str(tmp_path),), expert_parallel_size=2)
    for rank, res in enumerate(results):
        assert res["loaded_from"] == res["path"], res
        assert res["state"] == (2, 32)
        assert res["params_equal"], f"rank {rank}: weights differ after load"
        assert res["adam_keys_equal"] and res["adam_equal"], f"rank {rank}: Adam state differs after load"
        assert res["lr_equal"] and res["scheduler_steps"] == 2
        assert res["rng_equal"], f"rank {rank}: RNG state not restored"
        for case in ("truncated", "missing", "forged_manifest", "wrong_shape", "wrong_vocab"):
            assert res[case] == "ok", f"rank {rank}, {case}: {res[case]}"
        assert res["agreed"] == signal.SIGTERM
    checkpoint_dir = Path(results[0]["path"])
    assert (tmp_path / "checkpoints" / files.LATEST_MARKER).read_text().strip() == checkpoint_dir.name
    assert results[0]["num_bytes"] == files.directory_size(checkpoint_dir)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
