"""Checkpoints: megatron-core dist_checkpointing (torch_dist), atomic, verified, resumable, reshardable.

What one checkpoint holds (`<run_dir>/checkpoints/step_0000120/`; the state dict itself is
built in checkpoint_state.py, the files are handled in checkpoint_files.py):
- model: `GPTModel.sharded_state_dict()`: ShardedTensors keyed by global names, expert
  weights by global expert index, so any expert-/data-parallel layout can read them;
- optimizer: `MegatronOptimizer.sharded_state_dict(model_sd)`: Adam moments as ShardedTensors
  shaped like their parameters (same resharding as the model), the Adam step in common state;
- scheduler (megatron OptimizerParamScheduler.state_dict), train_state (step,
  consumed_samples = the data position, see training/batches.py), the parallel layout and the
  model config (to explain a mismatch), all in common state written by rank 0;
- rng: one ShardedObject per global rank (python, numpy, torch CPU, CUDA when present, and
  megatron's RNG-tracker states). Restored only when the layout is unchanged; after
  resharding, rank r of the new job has no "own" RNG stream to take, so they are skipped with
  a warning (the model has no dropout by default, so the losses do not depend on them);
- anyexperts_manifest.json: every file with its size and SHA-256, written last (see below).

Atomic save: all ranks write into `step_<7-digit step>.tmp/`. Then each rank hashes the files
it wrote (in parallel), and one all-gather brings every rank's outcome (its error, or its
checksums) to every rank. Only when every rank succeeded does rank 0 write the manifest,
rename the directory to `step_<7-digit step>` and replace the `latest` marker (write a temp
file, fsync, os.replace); then the oldest complete checkpoints beyond `checkpoint.keep_last`
are deleted. A crash at any point leaves either a `.tmp` directory (ignored, deleted by the
next save) or a complete checkpoint.

A failed save (disk full, permission denied, an exception on one rank) raises the same
RuntimeError on every rank, naming the failing rank and its error, right after the write:
the ranks keep issuing the same collectives in the same order because megatron reports its
shard-write failures collectively and the files only rank 0 writes inside megatron's save
(common.pt, .metadata, metadata.json) have their errors held back until the all-gather.
Nothing is published, so `latest` still names the previous complete checkpoint.

Verified load: before any tensor is read, every file of the manifest is checked for its
size and SHA-256, the files dealt out over all ranks by size; a mismatch names the file,
the checksum written and the one found.

Resume (`checkpoint.resume`): `auto` takes the checkpoint named by `latest` in this run's
checkpoint directory (or, when the marker is missing, the highest complete step_* there),
and starts fresh when there is none; `none` always starts fresh; a path (a step_* directory,
or a checkpoints directory meaning its latest) is loaded when this run has no checkpoint of
its own yet; once it has, its own newest wins, so that a requeued job with the same command
line continues instead of going back. A path that is not a checkpoint is an error.
Among the run's own checkpoints, one that fails verification is reported (a WARNING on the
console, a `checkpoint_rejected` event in metrics.jsonl), moved aside to step_*.bad and the
next older one is tried; newer unfinished saves are reported the same way
(`checkpoint_unfinished`). A checkpoint named by an explicit path that fails verification
stops the run with the error, and so does a run whose own checkpoints all fail.

Resharding: the model and the Adam moments are ShardedTensors keyed by parameter, so they load
at any expert-/data-parallel layout. megatron's ChainedOptimizer has one sub-optimizer at EP=1
and two (dense, expert) at EP>1; for the plain optimizer (CPU) only the tensors are read from
the checkpoint and this run's own param groups are kept, with the checkpoint's Adam step. The
distributed optimizer (GPU) uses megatron's own format (checkpoint.distributed_optimizer_format);
where that cannot map the layout change, the weights, scheduler and data position are loaded
and the Adam moments restart from zero, with a logged WARNING.

An incompatible checkpoint is an error: a model config or a vocabulary that changes a tensor
shape (all shapes are compared, also those megatron would pad to fit), or a file megatron
cannot read each raise RuntimeError on every rank, naming the checkpoint and the problem.

Usage (the trainer does this):

    ckpt = Checkpointer(cfg, run_dir, log_fn=logger.info, event_fn=logger.event)
    ckpt.resume(model, optimizer, scheduler, state)         # -> path or None
    ckpt.save(model, optimizer, scheduler, state)           # collective: every rank calls it
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from anyexperts.config import TrainConfig
from anyexperts.training.checkpoint_files import (
    LATEST_MARKER, MANIFEST, TMP_SUFFIX, checkpoint_file_names, checkpoint_root, directory_size, file_entries,
    files_written_by, find_latest, fsync_dir, has_checksums, is_complete, manifest_sizes, move_aside,
    plan_resume, prune, read_manifest, split_by_size, step_dir_name, step_of, verify_files, write_atomic,
    write_manifest)
from anyexperts.training.checkpoint_state import (
    FORMAT_VERSION, SHAPE_FIELDS, assemble_optimizer_state, build_state_dict, load_scheduler,
    optimizer_structure, optimizer_tensors_request, parallel_layout, read_common, set_rng_state,
    shape_problems, uses_distributed_optimizer)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_torch_dcp():
    """torch.distributed.checkpoint warns on every call that megatron's use of its
    ShardedTensor and load_state_dict is deprecated: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use DTensor instead.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _rank0_writes_deferred(errors: list[str]):
    """Inside megatron's save, rank 0 alone writes common.pt, .metadata and metadata.json,
    each between two collectives: raising there would leave the other ranks waiting in the
    next collective until the timeout. Their errors are appended to `errors` instead, the
    save runs on, and the all-gather after it makes every rank raise."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    targets = [(TorchCommonSaveStrategy, "save_common", "the common state (common.pt)"),
               (FileSystemWriterAsync, "finish", "the tensor metadata (.metadata)"),
               (serialization, "save_config", "metadata.json")]

    def deferring(fn, what):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # raised on every rank after the all-gather
                errors.append(f"writing {what} failed: {type(err).__name__}: {err}")
        return call

    saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in targets]
    try:
        for owner, name, what in targets:
            setattr(owner, name, deferring(getattr(owner, name), what))
        yield
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


# ------------------------------------------------------------------------------------------
# Collectives: every rank gets the same answer (or the same error).

def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Runs fn on rank 0 and hands its result, or its error, to every rank.

    A failure seen by rank 0 alone (a missing file) must stop every rank at the same point;
    otherwise the others would wait in the next collective until the timeout."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # handed to every rank, re-raised below
            error = f"{type(err).__name__}: {err}"
    payload = [(result, error)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    result, error = payload[0]
    if error is not None:
        raise RuntimeError(error)
    return result


def _all_gather(value: Any) -> list:
    if dist.get_world_size() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _any_rank_failed(error: Optional[str]) -> Optional[str]:
    """Every rank's error (or None) gathered, so that all raise together after a local failure."""
    errors = _all_gather(error)
    # torch's CheckpointException carries every rank's traceback: keep the start of each.
    failed = [f"rank {r}: {e if len(e) < 1500 else e[:1500] + ' ...'}" for r, e in enumerate(errors) if e]
    return "; ".join(failed) if failed else None


def verify_checkpoint(ckpt: Path) -> tuple[list[str], bool]:
    """(problems with ckpt's files, whether its manifest has checksums); collective.

    The files are dealt out over the ranks by size and each rank checks its share, so the
    time is that of reading 1/world_size of the checkpoint."""
    def listing():
        manifest, problem = read_manifest(ckpt)
        if problem:
            return [problem], {}, False
        try:
            return [], manifest_sizes(manifest), has_checksums(manifest)
        except (KeyError, TypeError, AttributeError) as err:
            return [f"{MANIFEST} is malformed ({type(err).__name__}: {err})"], {}, False

    problems, sizes, checksummed = _on_rank0(listing)
    if problems:
        return problems, checksummed
    share = split_by_size(sizes, dist.get_world_size())[dist.get_rank()]
    try:
        local = verify_files(ckpt, share)
    except Exception as err:  # gathered below, so that every rank returns the same list
        local = [f"verifying {share} failed ({type(err).__name__}: {err})"]
    return [p for rank_problems in _all_gather(local) for p in rank_problems], checksummed


# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SaveInfo:
    path: Path
    seconds: float
    num_bytes: int
    checksum_seconds: float = 0.0


class Checkpointer:
    """Saves and resumes the whole training state of a run (see the module docstring).

    log_fn(message) prints on the logging rank; event_fn(kind, fields) records an event
    (the trainer writes it to metrics.jsonl)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, log_fn: Optional[Callable[[str], None]] = None,
                 event_fn: Optional[Callable[[str, dict], None]] = None):
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self._log = log_fn or (lambda msg: log.info(msg))
        self._event = event_fn or (lambda kind, fields: None)
        # The newest checkpoint this run saved or resumed from (save() skips an existing one).
        self.last_saved_step: Optional[int] = None
        self.last_saved_path: Optional[Path] = None
        # Seconds the last verify() spent checking checksums and sizes.
        self.last_verify_seconds = 0.0

    # -- strategies ----------------------------------------------------------------------
    def _save_strategy(self):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.cfg.checkpoint.fully_parallel and dist.get_world_size() > 1:
            from megatron.core import parallel_state as ps

            # Replicated tensors (everything but experts at DP > 1) are written once, the
            # writes spread over the data-parallel ranks instead of all on the first replica.
            strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
        return strategy

    def _load_strategy(self, ckpt_dir: Path):
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        strategy = get_default_load_sharded_strategy(str(ckpt_dir))
        # The load-side wrapper exchanges the shards through CUDA tensors (exchange_utils.py:
        # torch.empty_like(..., device="cuda")), so on CPU every rank reads its own shards.
        if self.cfg.checkpoint.fully_parallel and dist.get_world_size() > 1 and torch.cuda.is_available():
            from megatron.core import parallel_state as ps

            strategy = FullyParallelLoadStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
        return strategy

    # -- save ----------------------------------------------------------------------------
    def save(self, model, optimizer, scheduler, state) -> Optional[SaveInfo]:
        """Writes step_<state.step> atomically; every rank must call it. None if it already exists.

        Raises the same RuntimeError on every rank when any rank failed to write its part;
        nothing is published then (see the module docstring)."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        final = self.root / step_dir_name(state.step)
        tmp = final.with_name(final.name + TMP_SUFFIX)

        def prepare() -> bool:
            if is_complete(final):
                return False
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # a directory without manifest: not ours to keep
                shutil.rmtree(final)
            tmp.mkdir()
            return True

        if not _on_rank0(prepare):
            self._log(f"checkpoint {final} already exists; not saving it again")
            self.last_saved_step, self.last_saved_path = state.step, final
            return None
        start = time.monotonic()
        error, deferred, entries = None, [], {}
        try:
            sharded = build_state_dict(self.cfg, model, optimizer, scheduler, state,
                                       with_optimizer=True, with_rng=True, is_loading=False)
            # Ends with a barrier: when it returns, every rank's files are written.
            with _quiet_torch_dcp(), _rank0_writes_deferred(deferred):
                dist_checkpointing.save(sharded, str(tmp), sharded_strategy=self._save_strategy(),
                                        validate_access_integrity=True)
        # megatron raises torch's CheckpointException (a BaseException) on every rank when a
        # shard write failed on any of them.
        except (Exception, CheckpointException) as err:
            error = f"{type(err).__name__}: {err}"
        error = error or ("; ".join(deferred) if deferred else None)
        hash_start = time.monotonic()
        if error is None:
            try:
                mine = files_written_by(checkpoint_file_names(tmp), dist.get_rank(), dist.get_world_size())
                entries = file_entries(tmp, mine)
            except Exception as err:  # gathered below: every rank raises it
                error = f"checksumming its files failed: {type(err).__name__}: {err}"
        outcomes = _all_gather((error, entries))
        checksum_seconds = time.monotonic() - hash_start
        failed = [f"rank {r}: {e if len(e) < 1500 else e[:1500] + ' ...'}" for r, (e, _) in enumerate(outcomes) if e]
        if failed:
            previous = find_latest(self.root)
            message = (f"saving checkpoint {final} failed, nothing was published: {'; '.join(failed)}. "
                       f"The latest checkpoint is still {previous or 'none'}; fix the cause (disk space, "
                       f"permissions of {self.root}) and restart: checkpoint.resume=auto continues from it")
            self._event("checkpoint_save_failed", {"step": state.step, "path": str(final), "error": message})
            raise RuntimeError(message)
        all_entries = {name: entry for _, rank_entries in outcomes for name, entry in rank_entries.items()}

        layout = parallel_layout()

        def publish() -> int:
            write_manifest(tmp, {"step": state.step, "consumed_samples": state.consumed_samples, "layout": layout},
                           entries=all_entries)
            os.rename(tmp, final)
            write_atomic(self.root / LATEST_MARKER, final.name + "\n")
            fsync_dir(self.root)
            for removed in prune(self.root, self.cfg.checkpoint.keep_last, keep=final):
                self._log(f"removed old checkpoint {removed}")
            return directory_size(final)

        num_bytes = _on_rank0(publish)
        info = SaveInfo(final, time.monotonic() - start, num_bytes, checksum_seconds)
        self.last_saved_step, self.last_saved_path = state.step, final
        self._log(f"saved checkpoint {final} ({num_bytes / 2**20:.1f} MiB in {info.seconds:.2f}s, "
                  f"checksums {checksum_seconds:.2f}s)")
        return info

    # -- load ----------------------------------------------------------------------------
    def resume(self, model, optimizer, scheduler, state) -> Optional[Path]:
        """Loads the checkpoint checkpoint.resume names into model, optimizer, scheduler, state, RNG.

        Returns its path, or None when starting fresh. Every rank must call it."""
        resume = self.cfg.checkpoint.resume
        plan = _on_rank0(lambda: plan_resume(resume, self.root))
        for reason in plan.skipped:
            self._log(f"WARNING: skipping {reason}")
            self._event("checkpoint_unfinished", {"step": 0, "reason": reason})
        if not plan.candidates:
            if resume == "auto":
                self._log(f"no checkpoint in {self.root}; starting from step 0")
            return None
        rejected = []
        for ckpt in plan.candidates:
            problems = self.verify(ckpt)
            if not problems:
                break
            if not plan.may_fall_back:
                raise RuntimeError(self._damaged_message(ckpt, problems))
            moved = _on_rank0(lambda: move_aside(ckpt))
            rejected.append({"path": str(ckpt), "moved_to": str(moved), "problems": problems})
            self._log(f"WARNING: checkpoint {ckpt} fails verification: {'; '.join(problems)}. Moved it aside to "
                      f"{moved}; trying the previous checkpoint")
            self._event("checkpoint_rejected", {"step": step_of(ckpt), **rejected[-1]})
        else:
            raise RuntimeError(f"no checkpoint in {self.root} verifies ({len(rejected)} tried, each moved aside "
                               f"to step_*.bad): {'; '.join(p for r in rejected for p in r['problems'])}. Restore "
                               "one from a copy, or start fresh with checkpoint.resume=none")
        if resume not in ("auto", "none") and ckpt.parent == self.root and Path(resume).resolve() != ckpt.resolve():
            self._log(f"checkpoint.resume={resume}: this run already has its own checkpoints in {self.root}; "
                      f"continuing from the newest that verifies, {ckpt}")
        self._restore(ckpt, model, optimizer, scheduler, state)
        if rejected:
            def point_latest_at_it():
                write_atomic(self.root / LATEST_MARKER, ckpt.name + "\n")
                fsync_dir(self.root)

            _on_rank0(point_latest_at_it)
            self._log(f"WARNING: resumed from {ckpt} instead of the newer {', '.join(r['path'] for r in rejected)}, "
                      f"which failed verification; training repeats the steps after {state.step}")
            self._event("checkpoint_fallback", {"step": state.step, "resumed_from": str(ckpt),
                                                "rejected": [r["path"] for r in rejected]})
        return ckpt

    def verify(self, ckpt: Path) -> list[str]:
        """Problems with ckpt's files (empty when it verifies); every rank must call it."""
        start = time.monotonic()
        problems, checksummed = verify_checkpoint(ckpt)
        self.last_verify_seconds = time.monotonic() - start
        if not problems and not checksummed:
            self._log(f"WARNING: {ckpt} was written before checkpoints had checksums: its files were checked "
                      "by size only")
        return problems

    @staticmethod
    def _damaged_message(ckpt: Path, problems: list[str]) -> str:
        return (f"checkpoint {ckpt} is damaged: {'; '.join(problems)}. Resume from another checkpoint "
                f"(checkpoint.resume=<path>), or move it out of {ckpt.parent} (or rename it to "
                f"{ckpt.name}.bad) to resume from the previous one")

    def load(self, ckpt: Path, model, optimizer, scheduler, state) -> None:
        """Verifies and loads `ckpt` (see the module docstring); every rank must call it, and
        every rank raises the same RuntimeError when it cannot be used."""
        problems = self.verify(ckpt)
        if problems:
            raise RuntimeError(self._damaged_message(ckpt, problems))
        self._restore(ckpt, model, optimizer, scheduler, state)

    def _restore(self, ckpt: Path, model, optimizer, scheduler, state) -> None:
        """Loads a verified `ckpt`."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling
        from torch.distributed.checkpoint.api import CheckpointException

        start = time.monotonic()
        common = _on_rank0(lambda: read_common(ckpt))
        self._check_compatible(ckpt, common)
        saved_layout, layout = common["layout"], parallel_layout()
        same_layout = saved_layout == layout
        with_optimizer = self.cfg.checkpoint.load_optimizer and not self.cfg.trainer.eval_only
        distributed = uses_distributed_optimizer(optimizer)
        same_structure = common.get("optimizer_structure") == optimizer_structure(optimizer)
        model_only_reason = None
        if with_optimizer and distributed and not same_layout \
                and self.cfg.checkpoint.distributed_optimizer_format != "fully_reshardable":
            model_only_reason = (f"the distributed optimizer format "
                                 f"{self.cfg.checkpoint.distributed_optimizer_format!r} reshards only over "
                                 "data-parallel ranks")
        elif with_optimizer and distributed and not same_structure:
            model_only_reason = (f"the checkpoint's sub-optimizers {common.get('optimizer_structure')} differ "
                                 f"from this run's {optimizer_structure(optimizer)} (expert-parallel size 1 vs "
                                 ">1), which megatron's distributed optimizer cannot map")
        if model_only_reason:
            with_optimizer = False
            self._log(f"WARNING: {ckpt} was saved at layout {saved_layout}, this run has {layout}, and "
                      f"{model_only_reason}: loading model weights, scheduler and data position only; "
                      "the Adam moments start from zero")
        # Non-distributed optimizers: load the moments by parameter key and keep this run's own
        # optimizer structure (works at any layout). Distributed: megatron's own structure.
        tensors_only = with_optimizer and not distributed
        if not same_layout:
            self._log(f"resharding {ckpt}: saved at {saved_layout}, loading at {layout}; "
                      "per-rank RNG states are not restored (they belong to the old ranks)")

        sharded = build_state_dict(self.cfg, model, optimizer, scheduler, state,
                                   with_optimizer=with_optimizer and not tensors_only,
                                   with_rng=same_layout, is_loading=True)
        optimizer_rest = None
        if tensors_only:
            sharded["optimizer_tensors"], optimizer_rest = optimizer_tensors_request(
                self.cfg, sharded["model"], optimizer)

        error = None
        try:
            problems = shape_problems(ckpt, sharded)
            error = "; ".join(problems) if problems else None
        except (Exception, CheckpointException) as err:
            error = f"its tensor metadata is unreadable ({type(err).__name__}: {err})"
        error = _any_rank_failed(error)
        if error:
            raise RuntimeError(f"checkpoint {ckpt} does not fit this model: {error}. The model settings or the "
                               "tokenizer differ from the run that wrote it (see its config.yaml)")

        loaded = None
        try:
            with _quiet_torch_dcp():
                loaded = dist_checkpointing.load(sharded, str(ckpt), sharded_strategy=self._load_strategy(ckpt),
                                                 strict=StrictHandling.RAISE_UNEXPECTED)
        # torch.distributed.checkpoint's CheckpointException (a damaged file on some rank) derives
        # from BaseException, not Exception. Reported with the path below, on every rank together.
        except (Exception, CheckpointException) as err:
            error = f"{type(err).__name__}: {err}"
        error = _any_rank_failed(error)
        if error:
            raise RuntimeError(f"checkpoint {ckpt} could not be read: {error}. If a file in it is damaged, move "
                               f"it out of {ckpt.parent} (or rename it to {ckpt.name}.bad) to resume from the "
                               "previous one")

        try:
            model.load_state_dict(loaded["model"], strict=True)
            if tensors_only:
                optimizer.load_state_dict(assemble_optimizer_state(
                    optimizer_rest, loaded.get("optimizer_tensors", {}), common["adam_steps"]))
            elif with_optimizer:
                optimizer.load_state_dict(loaded["optimizer"])
            else:
                # Mixed-precision optimizers keep fp32 main copies of the weights: refresh them.
                optimizer.reload_model_params()
            load_scheduler(scheduler, loaded["scheduler"], ckpt)
        except (RuntimeError, ValueError, KeyError) as err:
            error = f"{type(err).__name__}: {err}"
        error = _any_rank_failed(error)
        if error:
            raise RuntimeError(f"checkpoint {ckpt} does not fit this run: {error}")
        state.step = int(loaded["train_state"]["step"])
        state.consumed_samples = int(loaded["train_state"]["consumed_samples"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        self.last_saved_step, self.last_saved_path = state.step, ckpt
        what = "model, optimizer" if with_optimizer else "model (optimizer state not loaded)"
        self._log(f"resumed from {ckpt}: {what}, scheduler, step {state.step}, consumed_samples "
                  f"{state.consumed_samples} in {time.monotonic() - start:.2f}s (files verified in "
                  f"{self.last_verify_seconds:.2f}s before)")

    def _check_compatible(self, ckpt: Path, common: dict) -> None:
        if common.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"checkpoint {ckpt} has format_version={common.get('format_version')}, this code "
                               f"reads {FORMAT_VERSION}; it was written by another version of anyexperts")
        saved = common.get("model_config", {})
        mismatches = []
        for group, keys in SHAPE_FIELDS.items():
            current = dataclasses.asdict(getattr(self.cfg, group))
            for key in keys:
                if key in saved.get(group, {}) and saved[group][key] != current[key]:
                    mismatches.append(f"{group}.{key}={current[key]!r} here but {saved[group][key]!r} in the checkpoint")
        if mismatches:
            raise RuntimeError(f"checkpoint {ckpt} was written for another model: {'; '.join(mismatches)}. "
                               "Use the model settings of the run that wrote it (its config.yaml), or "
                               "checkpoint.resume=none to start fresh")


