"""Checkpoints: megatron-core dist_checkpointing (torch_dist), atomic, resumable, reshardable.

What one checkpoint holds (`<run_dir>/checkpoints/step_0000120/`):
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
- anyexperts_manifest.json: every file with its size, written last (see below).

Atomic: all ranks write into `step_<7-digit step>.tmp/`; after the save's final barrier rank 0 lists
the files into the manifest, renames the directory to `step_<7-digit step>` and then replaces the
`latest` marker (write a temp file, fsync, os.replace). A crash at any point leaves either a
`.tmp` directory (ignored, deleted by the next save) or a complete checkpoint. Then the
oldest complete checkpoints beyond `checkpoint.keep_last` are deleted.

Resume (`checkpoint.resume`): `auto` takes the checkpoint named by `latest` in this run's
checkpoint directory (or, when the marker is missing, the highest complete step_* there),
and starts fresh when there is none; `none` always starts fresh; a path (a step_* directory,
or a checkpoints directory meaning its latest) is loaded when this run has no checkpoint of
its own yet; once it has, its own newest wins, so that a requeued job with the same command
line continues instead of going back. A path that is not a checkpoint is an error.

Resharding: the model and the Adam moments are ShardedTensors keyed by parameter, so they load
at any expert-/data-parallel layout. megatron's ChainedOptimizer has one sub-optimizer at EP=1
and two (dense, expert) at EP>1; for the plain optimizer (CPU) only the tensors are read from
the checkpoint and this run's own param groups are kept, with the checkpoint's Adam step. The
distributed optimizer (GPU) uses megatron's own format (checkpoint.distributed_optimizer_format);
where that cannot map the layout change, the weights, scheduler and data position are loaded
and the Adam moments restart from zero, with a logged WARNING.

A corrupt or incompatible checkpoint is an error, never a silent fallback: missing or
truncated files (checked against the manifest before anything is read), a model config or a
vocabulary that changes a tensor shape (all shapes are compared, also those megatron would
pad to fit), or a file megatron cannot read each raise RuntimeError on every rank, naming
the checkpoint and the problem. To go back to the previous checkpoint, move the bad one out
of the checkpoints directory (or rename it, e.g. step_0000120.bad) and start again.

Usage (the trainer does this):

    ckpt = Checkpointer(cfg, run_dir, log_fn=logger.info)
    ckpt.resume(model, optimizer, scheduler, state)         # -> path or None
    ckpt.save(model, optimizer, scheduler, state)           # collective: every rank calls it
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from anyexperts.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_MARKER = "latest"
MANIFEST = "anyexperts_manifest.json"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7,})$")

# Model/MoE settings that change a tensor's shape or the set of tensors: a checkpoint written
# with other values cannot be loaded into this model.
_SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "activation",
              "normalization", "position_embedding_type", "share_embeddings_and_output_weights",
              "make_vocab_size_divisible_by"),
    "moe": ("kind", "num_experts", "expert_ffn_hidden_size", "layer_freq", "grouped_gemm"),
}


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_root(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / CHECKPOINTS_SUBDIR


# ------------------------------------------------------------------------------------------
# Files on disk (no torch.distributed needed: these run on rank 0 or in tests)

def is_complete(path: Path) -> bool:
    """A finished checkpoint: a step_* directory (not .tmp) with its manifest."""
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / MANIFEST).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or the highest complete one when the marker is missing."""
    marker = root / LATEST_MARKER
    if marker.is_file():
        target = root / marker.read_text().strip()
        if is_complete(target):
            return target
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                    marker, target)
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """The checkpoint to load for checkpoint.resume (auto | none | <path>), or None to start fresh.

    The run's own newest checkpoint (under root) wins over a given path: a preempted and
    requeued job restarts with the same command line, and must continue from where it
    stopped, not go back to the path it started from."""
    if resume == "none":
        return None
    own = find_latest(root)
    if resume == "auto" or own is not None:
        return own
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    if path.is_dir() and _STEP_DIR.match(path.name.removesuffix(TMP_SUFFIX)):
        raise RuntimeError(f"checkpoint.resume={path} is an unfinished checkpoint (no {MANIFEST}): its save "
                           "was interrupted; resume from an older step_* directory next to it")
    raise RuntimeError(f"checkpoint.resume={path} is not a checkpoint (a directory such as step_0000100 "
                       f"holding {MANIFEST}) nor a directory holding any; give one, or checkpoint.resume=auto|none")


def write_manifest(ckpt_dir: Path, extra: dict) -> dict:
    files = {}
    for path in sorted(ckpt_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(ckpt_dir))] = path.stat().st_size
    manifest = {"format_version": FORMAT_VERSION, "files": files, **extra}
    _write_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_files(ckpt_dir: Path) -> list[str]:
    """Problems with a checkpoint's files (missing, truncated, no manifest); empty when sound."""
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        return [f"{MANIFEST} is missing: the save did not finish"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{MANIFEST} is unreadable ({err})"]
    problems = []
    for name, size in manifest.get("files", {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)")
    return problems


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Deletes complete checkpoints older than the newest keep_last (never `keep`), and stale .tmp dirs."""
    removed = []
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            if old.resolve() != keep.resolve():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    for stale in root.glob(f"step_*{TMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def _quiet_torch_dcp():
    """torch.distributed.checkpoint warns on every call that megatron's use of its
    ShardedTensor and load_state_dict is deprecated: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use DTensor instead.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)
        yield


# ------------------------------------------------------------------------------------------
# Collectives: rank 0 decides, every rank gets the same answer (or the same error).

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


def _any_rank_failed(error: Optional[str]) -> Optional[str]:
    """Every rank's error (or None) gathered, so that all raise together after a local failure."""
    if dist.get_world_size() == 1:
        return error
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    # torch's CheckpointException carries every rank's traceback: keep the start of each.
    failed = [f"rank {r}: {e if len(e) < 1500 else e[:1500] + ' ...'}" for r, e in enumerate(errors) if e]
    return "; ".join(failed) if failed else None


# ------------------------------------------------------------------------------------------
# State

def parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "megatron_tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


def optimizer_structure(optimizer) -> list[str]:
    """The class of each sub-optimizer of megatron's ChainedOptimizer. megatron makes a
    separate expert optimizer only at expert-parallel size > 1 (at EP=1 experts are plain
    data-parallel parameters), so this changes between EP=1 and EP>1."""
    return [type(opt).__name__ for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _sharded_state_dict_metadata(cfg: TrainConfig, optimizer) -> dict:
    # chained_optim_avoid_prefix: the expert and the dense optimizers of megatron's
    # ChainedOptimizer store their state under the parameters' own keys, so the keys do not
    # depend on how many sub-optimizers there are. singleton_local_shards=False: one
    # ShardedTensor per expert-stacked weight, as Megatron-LM saves.
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if _uses_distributed_optimizer(optimizer):
        metadata["distrib_optim_sharding_type"] = cfg.checkpoint.distributed_optimizer_format
        from megatron.core import parallel_state as ps

        metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _train_state_fields(state) -> dict:
    return {"step": int(state.step), "consumed_samples": int(state.consumed_samples)}


def build_state_dict(cfg: TrainConfig, model, optimizer, scheduler, state, *, with_optimizer: bool,
                     with_rng: bool, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject

    metadata = _sharded_state_dict_metadata(cfg, optimizer)
    sharded = {"model": model.sharded_state_dict(metadata=metadata)}
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=is_loading,
                                                            metadata=metadata)
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = _train_state_fields(state)
    sharded["layout"] = parallel_layout()
    sharded["optimizer_structure"] = optimizer_structure(optimizer)
    sharded["model_config"] = {group: {k: dataclasses.asdict(getattr(cfg, group))[k] for k in keys}
                               for group, keys in _SHAPE_FIELDS.items()}
    sharded["format_version"] = FORMAT_VERSION
    if with_rng:
        # One object per global rank; replica_id 0 everywhere because no two ranks hold the
        # same one. The global shape is the world size, so a different world cannot ask for it.
        sharded["rng_state"] = ShardedObject("rng_state", rng_state() if not is_loading else None,
                                             (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)
    return sharded


# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SaveInfo:
    path: Path
    seconds: float
    num_bytes: int


class Checkpointer:
    """Saves and resumes the whole training state of a run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, log_fn: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self._log = log_fn or (lambda msg: log.info(msg))
        # The newest checkpoint this run saved or resumed from (save() skips an existing one).
        self.last_saved_step: Optional[int] = None
        self.last_saved_path: Optional[Path] = None

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
        """Writes step_<state.step> atomically; every rank must call it. None if it already exists."""
        from megatron.core import dist_checkpointing

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
        sharded = build_state_dict(self.cfg, model, optimizer, scheduler, state,
                                   with_optimizer=True, with_rng=True, is_loading=False)
        # Ends with a barrier: when it returns, every rank's files are written.
        with _quiet_torch_dcp():
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=self._save_strategy(),
                                    validate_access_integrity=True)

        layout = parallel_layout()

        def publish() -> int:
            write_manifest(tmp, {"step": state.step, "consumed_samples": state.consumed_samples, "layout": layout})
            os.rename(tmp, final)
            _write_atomic(self.root / LATEST_MARKER, final.name + "\n")
            _fsync_dir(self.root)
            for removed in prune(self.root, self.cfg.checkpoint.keep_last, keep=final):
                self._log(f"removed old checkpoint {removed}")
            return directory_size(final)

        num_bytes = _on_rank0(publish)
        info = SaveInfo(final, time.monotonic() - start, num_bytes)
        self.last_saved_step, self.last_saved_path = state.step, final
        self._log(f"saved checkpoint {final} ({num_bytes / 2**20:.1f} MiB in {info.seconds:.2f}s)")
        return info

    # -- load ----------------------------------------------------------------------------
    def resume(self, model, optimizer, scheduler, state) -> Optional[Path]:
        """Loads the checkpoint checkpoint.resume names into model, optimizer, scheduler, state, RNG.

        Returns its path, or None when starting fresh. Every rank must call it."""
        resume = self.cfg.checkpoint.resume
        ckpt = _on_rank0(lambda: resolve_resume(resume, self.root))
        if ckpt is None:
            if resume == "auto":
                self._log(f"no checkpoint in {self.root}; starting from step 0")
            return None
        if resume not in ("auto", "none") and Path(ckpt).parent == self.root and \
                Path(resume).resolve() != Path(ckpt).resolve():
            self._log(f"checkpoint.resume={resume}: this run already has its own checkpoints in {self.root}; "
                      f"continuing from the newest, {ckpt}")
        self.load(Path(ckpt), model, optimizer, scheduler, state)
        return Path(ckpt)

    def load(self, ckpt: Path, model, optimizer, scheduler, state) -> None:
        """Loads `ckpt` (see the module docstring); every rank must call it, and every rank
        raises the same RuntimeError when it cannot be used."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling
        from torch.distributed.checkpoint.api import CheckpointException

        start = time.monotonic()
        problems = _on_rank0(lambda: verify_files(ckpt))
        if problems:
            raise RuntimeError(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}. Move it out of "
                               f"{ckpt.parent} (or rename it to {ckpt.name}.bad) to resume from the previous one")
        common = _on_rank0(lambda: _read_common(ckpt))
        self._check_compatible(ckpt, common)
        saved_layout, layout = common["layout"], parallel_layout()
        same_layout = saved_layout == layout
        with_optimizer = self.cfg.checkpoint.load_optimizer and not self.cfg.trainer.eval_only
        distributed = _uses_distributed_optimizer(optimizer)
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
            _load_scheduler(scheduler, loaded["scheduler"], ckpt)
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
                  f"{state.consumed_samples} in {time.monotonic() - start:.2f}s")

    def _check_compatible(self, ckpt: Path, common: dict) -> None:
        if common.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"checkpoint {ckpt} has format_version={common.get('format_version')}, this code "
                               f"reads {FORMAT_VERSION}; it was written by another version of anyexperts")
        saved = common.get("model_config", {})
        mismatches = []
        for group, keys in _SHAPE_FIELDS.items():
            current = dataclasses.asdict(getattr(self.cfg, group))
            for key in keys:
                if key in saved.get(group, {}) and saved[group][key] != current[key]:
                    mismatches.append(f"{group}.{key}={current[key]!r} here but {saved[group][key]!r} in the checkpoint")
        if mismatches:
            raise RuntimeError(f"checkpoint {ckpt} was written for another model: {'; '.join(mismatches)}. "
                               "Use the model settings of the run that wrote it (its config.yaml), or "
                               "checkpoint.resume=none to start fresh")


def _sharded_tensors(node):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(node):
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors(value.build())


def shape_problems(ckpt: Path, sharded: dict, limit: int = 5) -> list[str]:
    """Requested tensors that the checkpoint lacks or holds with another global shape.

    megatron checks global shapes itself, except for tensors marked allow_shape_mismatch: the
    word embeddings and the output layer, which it zero-pads or cuts to fit (meant for a
    change of vocabulary padding). A checkpoint from another tokenizer would then load
    silently wrong, so every shape is compared here; a changed padded vocabulary size is
    refused too."""
    from megatron.core import dist_checkpointing

    in_checkpoint = dist_checkpointing.load_tensors_metadata(str(ckpt))
    problems = []
    for tensor in _sharded_tensors(sharded):
        saved = in_checkpoint.get(tensor.key)
        if saved is None:
            problems.append(f"{tensor.key} is not in the checkpoint")
        elif tuple(saved.global_shape) != tuple(tensor.global_shape):
            problems.append(f"{tensor.key} is {tuple(saved.global_shape)} in the checkpoint but "
                            f"{tuple(tensor.global_shape)} in this model")
    if len(problems) > limit:
        problems = problems[:limit] + [f"and {len(problems) - limit} more"]
    return problems


def _read_common(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    small = {k: common.get(k) for k in ("layout", "model_config", "format_version", "train_state",
                                        "optimizer_structure")}
    # The Adam step count (megatron keeps it out of the sharded tensors, as `common_step`).
    small["adam_steps"] = _find_common_steps(common.get("optimizer"))
    return small


def _find_common_steps(node) -> list:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "common_step":
                found.append(value)
            else:
                found.extend(_find_common_steps(value))
    elif isinstance(node, (list, tuple)):
        for value in node:
            found.extend(_find_common_steps(value))
    return found


def optimizer_tensors_request(cfg: TrainConfig, model_sharded: dict, optimizer) -> tuple[dict, dict]:
    """(the optimizer's sharded tensors, everything else of its state dict), both in this run's
    structure. Used when the checkpoint's sub-optimizer structure differs (EP=1 <-> EP>1):
    the tensors are keyed by parameter, so they load at any layout; the rest (param groups)
    is this run's own."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    current = optimizer.sharded_state_dict(model_sharded, is_loading=True,
                                           metadata=_sharded_state_dict_metadata(cfg, optimizer))
    tensors, rest = extract_sharded_base(current)
    rest = dict_list_map_inplace(lambda v: v.unwrap() if isinstance(v, LocalNonpersistentObject) else v, rest)
    return tensors, rest


def assemble_optimizer_state(rest: dict, loaded_tensors: dict, adam_steps: list) -> dict:
    """This run's optimizer state dict with the loaded moments and the checkpoint's Adam step."""
    from megatron.core.dist_checkpointing.dict_utils import merge

    state_dict = merge(rest, loaded_tensors)
    steps = {float(s) for s in adam_steps}
    if len(steps) > 1:
        raise ValueError(f"the sub-optimizers in the checkpoint are at different Adam steps {sorted(steps)}")
    if adam_steps:
        _put_common_step(state_dict, adam_steps[0])
    return state_dict


def _put_common_step(node, step) -> None:
    import copy

    if isinstance(node, dict):
        # A torch optimizer state dict: megatron's load_state_dict spreads common_step to every param.
        if isinstance(node.get("state"), dict) and "param_groups" in node:
            node["state"]["common_step"] = copy.deepcopy(step)
            return
        for value in node.values():
            _put_common_step(value, step)
    elif isinstance(node, list):
        for value in node:
            _put_common_step(value, step)


def _load_scheduler(scheduler, saved: dict, ckpt: Path) -> None:
    # megatron's load_state_dict *adds* the saved step count (self.step(increment=num_steps)).
    scheduler.num_steps = 0
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as err:
        # megatron asserts that the schedule (max/min lr, warmup, decay steps, style) is unchanged.
        raise ValueError(f"the learning-rate schedule differs from the one in {ckpt} ({err}); resume with "
                         "the same optim.* and trainer.max_steps, or checkpoint.resume=none") from None
