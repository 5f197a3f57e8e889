"""Checkpoint integrity: checksums, fallback to the newest checkpoint that verifies, failed saves.

Fast tests work on fake checkpoint directories. One spawned 2-process job (EP=2, gloo)
saves real checkpoints at steps 2 and 4, flips one bit in a shard of step 4 (size
unchanged) and checks: an explicit resume of step 4 fails on both ranks naming the file and
both checksums; checkpoint.resume=auto falls back to step 2, moves step 4 aside, records the
events and gives the same losses afterwards as a run resumed from a copy of step 2. Then a
save made to fail on one rank (a shard write with ENOSPC on rank 1, common.pt with EACCES on
rank 0, an exception while rank 1 checksums) stops both ranks with that error, well before
the collective timeout, publishes nothing, and step 2 still loads.

    pytest tests/test_checkpoint_integrity.py
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from anyexperts.training import checkpoint_files as files
from tests.test_checkpoint import _fake_checkpoint

COLLECTIVE_TIMEOUT_S = 120  # tests/distributed.py's process-group timeout


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flip_with_the_size_unchanged_is_reported_with_both_checksums(tmp_path):
    path = _fake_checkpoint(tmp_path, 1, payload=bytes(range(256)) * 4)
    written = json.loads((path / files.MANIFEST).read_text())["files"]["__0_0.distcp"]["checksum"]
    assert files.verify_files(path) == []
    _flip_one_bit(path / "__0_0.distcp")
    (problem,) = files.verify_files(path)
    found = files.file_checksum(path / "__0_0.distcp")
    assert problem.startswith("__0_0.distcp has sha256 ")
    assert found in problem and written in problem and found != written


def test_a_manifest_without_checksums_is_still_checked_by_size(tmp_path):
    path = _fake_checkpoint(tmp_path, 1)
    manifest = json.loads((path / files.MANIFEST).read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (path / files.MANIFEST).write_text(json.dumps(manifest))
    assert not files.has_checksums(manifest)
    assert files.verify_files(path) == []
    with open(path / "common.pt", "ab") as f:
        f.write(b"!")
    assert files.verify_files(path) == ["common.pt has 7 bytes, 6 were written (truncated or overwritten)"]


def test_plan_resume_lists_own_checkpoints_newest_first_and_reports_unfinished_saves(tmp_path):
    two, four = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)
    plan = files.plan_resume("auto", tmp_path)
    assert plan.candidates == [four, two] and plan.may_fall_back
    assert plan.skipped == [f"{tmp_path / 'step_0000006.tmp'} is an unfinished save (no {files.MANIFEST})"]
    (tmp_path / files.LATEST_MARKER).write_text("step_0000008\n")
    assert any("names step_0000008, which is not a complete checkpoint" in r
               for r in files.plan_resume("auto", tmp_path).skipped)
    # An explicit path: only that checkpoint, no fallback; the run's own still win.
    explicit = files.plan_resume(str(two), tmp_path / "other-run")
    assert explicit.candidates == [two] and not explicit.may_fall_back
    assert files.plan_resume(str(two), tmp_path).candidates[0] == four


def test_a_checkpoint_moved_aside_is_neither_resumed_counted_nor_pruned(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    bad = files.move_aside(tmp_path / "step_0000003")
    assert bad.name == "step_0000003.bad" and bad.is_dir()
    _fake_checkpoint(tmp_path, 3)
    assert files.move_aside(tmp_path / "step_0000003").name == "step_0000003.bad.1"
    assert files.find_latest(tmp_path).name == "step_0000002"
    files.prune(tmp_path, keep_last=1, keep=tmp_path / "step_0000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003.bad", "step_0000003.bad.1"]


def test_every_file_has_one_writer_and_one_verifier():
    names = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp", "common.pt", ".metadata",
             "metadata.json", "rng_state/shard_0_2.pt"]
    writers = [files.files_written_by(names, rank, 2) for rank in range(2)]
    assert writers[1] == ["__1_0.distcp", "__1_1.distcp"]
    assert sorted(writers[0] + writers[1]) == sorted(names)
    sizes = {name: 10 * (i + 1) for i, name in enumerate(names)}
    shares = files.split_by_size(sizes, 2)
    assert sorted(shares[0] + shares[1]) == sorted(names)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(sizes.values())


# --------------------------------------------------------------------------------------------
# One real 2-process job (EP=2).

def _train_losses(cfg, ddp, optimizer, scheduler, num_steps: int, seed: int) -> list[float]:
    import torch
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    losses = []
    for _ in range(num_steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, 256, (2, cfg.model.seq_length), generator=generator)
        positions = torch.arange(cfg.model.seq_length).expand(2, -1)
        loss = ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean()
        loss.backward()
        ddp.finish_grad_sync()
        optimizer.step()
        scheduler.step(increment=1)
        losses.append(float(loss.detach()))
    return losses


def _save_failure(checkpointer, model, optimizer, scheduler, state) -> dict:
    import time

    start = time.monotonic()
    try:
        checkpointer.save(model, optimizer, scheduler, state)
    except RuntimeError as err:
        return {"seconds": time.monotonic() - start, "message": str(err)}
    return {"seconds": time.monotonic() - start, "message": "no error raised"}


def _bit_flip_fallback_and_failed_saves(rank, world_size, tmp):
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

    from anyexperts.training import checkpoint as ckpt
    from anyexperts.training.trainer import TrainState, setup_parallel
    from tests.test_checkpoint import _build, _tiny_cfg

    tmp = Path(tmp)
    run_dir = tmp / "run"
    cfg = _tiny_cfg()
    setup_parallel(cfg)
    model, ddp, optimizer, scheduler = _build(cfg)
    checkpointer = ckpt.Checkpointer(cfg, run_dir)
    _train_losses(cfg, ddp, optimizer, scheduler, 2, seed=5)
    step2 = checkpointer.save(model, optimizer, scheduler, TrainState(step=2, consumed_samples=32)).path
    _train_losses(cfg, ddp, optimizer, scheduler, 2, seed=6)
    step4 = checkpointer.save(model, optimizer, scheduler, TrainState(step=4, consumed_samples=64)).path
    results = {}
    copy_of_step2 = tmp / "copy" / step2.name
    if rank == 0:
        shutil.copytree(step2, copy_of_step2)
        shard = max(step4.glob("*.distcp"), key=lambda p: p.stat().st_size)
        _flip_one_bit(shard)
        results["shard"] = shard.name
        results["checksum_written"] = json.loads((step4 / files.MANIFEST).read_text())["files"][shard.name]["checksum"]
        results["checksum_found"] = files.file_checksum(shard)
    dist.barrier()

    def resume(resume_from: str, run: Path, events: list) -> tuple:
        cfg_resume = _tiny_cfg()
        cfg_resume.checkpoint.resume = resume_from
        m, d, o, s = _build(cfg_resume)
        state = TrainState()
        path = ckpt.Checkpointer(cfg_resume, run, event_fn=lambda kind, fields: events.append((kind, fields))).resume(
            m, o, s, state)
        return path, state, (m, d, o, s)

    try:
        resume(str(step4), tmp / "explicit", [])
        results["explicit"] = "no error raised"
    except RuntimeError as err:
        results["explicit"] = str(err)

    _, ref_state, (_, d, o, s) = resume(str(copy_of_step2), tmp / "reference", [])
    results["reference_losses"] = _train_losses(cfg, d, o, s, 2, seed=6)
    events: list = []
    path, state, (m, d, o, s) = resume("auto", run_dir, events)
    results["auto_path"], results["auto_step"] = str(path), state.step
    results["auto_losses"] = _train_losses(cfg, d, o, s, 2, seed=6)
    results["events"] = [kind for kind, _ in events]
    results["latest_after_fallback"] = (run_dir / "checkpoints" / files.LATEST_MARKER).read_text().strip()
    results["moved_aside"] = sorted(p.name for p in (run_dir / "checkpoints").glob("*.bad*"))

    # Saves that fail on one rank, at step 4 again (its directory was moved aside).
    state = TrainState(step=4, consumed_samples=64)
    failing = ckpt.Checkpointer(cfg, run_dir)
    failures = {}
    original_write_item = filesystem_async._write_item
    if rank == 1:
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        filesystem_async._write_item = disk_full
    failures["shard_write_enospc_rank1"] = _save_failure(failing, m, o, s, state)
    filesystem_async._write_item = original_write_item

    original_save_common = TorchCommonSaveStrategy.save_common
    if rank == 0:
        def permission_denied(self, common_state_dict, checkpoint_dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(checkpoint_dir) / "common.pt"))
        TorchCommonSaveStrategy.save_common = permission_denied
    failures["common_write_eacces_rank0"] = _save_failure(failing, m, o, s, state)
    TorchCommonSaveStrategy.save_common = original_save_common

    original_entries = ckpt.file_entries
    if rank == 1:
        def checksum_crash(*args, **kwargs):
            raise RuntimeError("exception injected while rank 1 checksums")
        ckpt.file_entries = checksum_crash
    failures["checksum_exception_rank1"] = _save_failure(failing, m, o, s, state)
    ckpt.file_entries = original_entries
    results["failures"] = failures
    results["latest_after_failures"] = (run_dir / "checkpoints" / files.LATEST_MARKER).read_text().strip()
    results["step4_complete"] = files.is_complete(run_dir / "checkpoints" / "step_0000004")

    m, _, o, s = _build(cfg)
    loaded = TrainState()
    ckpt.Checkpointer(cfg, run_dir).load(step2, m, o, s, loaded)
    results["older_loads"] = loaded.step
    return results


def test_bit_flip_fallback_and_failed_saves_on_one_rank(tmp_path):
    from tests.distributed import run_distributed

    results = run_distributed(_bit_flip_fallback_and_failed_saves, 2, args=(str(tmp_path),), expert_parallel_size=2)
    shard, written, found = (results[0][k] for k in ("shard", "checksum_written", "checksum_found"))
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    for rank, res in enumerate(results):
        assert "is damaged" in res["explicit"] and shard in res["explicit"], (rank, res["explicit"])
        assert written in res["explicit"] and found in res["explicit"], (rank, res["explicit"])
        assert res["auto_path"] == str(step2) and res["auto_step"] == 2
        assert res["auto_losses"] == res["reference_losses"], rank
        assert res["latest_after_fallback"] == "step_0000002"
        assert res["moved_aside"] == ["step_0000004.bad"]
        for case, outcome in res["failures"].items():
            message = outcome["message"]
            assert "nothing was published" in message, (rank, case, message)
            assert outcome["seconds"] < COLLECTIVE_TIMEOUT_S / 2, (rank, case, outcome["seconds"])
        assert "rank 1: " in res["failures"]["shard_write_enospc_rank1"]["message"]
        assert "No space left on device" in res["failures"]["shard_write_enospc_rank1"]["message"]
        assert "rank 0: writing the common state (common.pt) failed: PermissionError" in \
            res["failures"]["common_write_eacces_rank0"]["message"]
        assert "rank 1: checksumming its files failed: RuntimeError: exception injected" in \
            res["failures"]["checksum_exception_rank1"]["message"]
        assert res["latest_after_failures"] == "step_0000002" and not res["step4_complete"]
        assert res["older_loads"] == 2
    # Only rank 0 logs events (the trainer's MetricsLogger); here every rank collected them.
    assert results[0]["events"] == ["checkpoint_rejected", "checkpoint_fallback"]


def test_metrics_logger_writes_events_next_to_steps(tmp_path):
    from anyexperts.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, console=False)
    logger.log(3, {"loss": 2.5})
    logger.event("checkpoint_fallback", {"step": 2, "resumed_from": "step_0000002"})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1] == {"event": "checkpoint_fallback", "step": 2, "resumed_from": "step_0000002"}


@pytest.mark.parametrize("world_size", [1, 3])
def test_split_by_size_gives_every_file_to_exactly_one_rank(world_size):
    sizes = {f"__{i}_0.distcp": 1000 - i for i in range(7)}
    shares = files.split_by_size(sizes, world_size)
    assert len(shares) == world_size
    assert sorted(n for share in shares for n in share) == sorted(sizes)
