"""A checkpoint's files on disk: layout, manifest with checksums, verification, selection, pruning.

Nothing here uses torch.distributed: these functions run on one rank (rank 0, or each rank
on its share of the files) and in tests. The save/load protocol is in checkpoint.py.

The manifest (`anyexperts_manifest.json`, written last) holds every file of the checkpoint
with its size and its SHA-256, each computed by the rank that wrote the file, from the
file as it is on disk after the write. hashlib's SHA-256 is used because it runs on the
CPU's SHA instructions where present (about 2x blake2b here) and needs no extra package.
Manifests written before checksums existed hold only sizes; they are checked by size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from anyexperts.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_MARKER = "latest"
MANIFEST = "anyexperts_manifest.json"
TMP_SUFFIX = ".tmp"
BAD_SUFFIX = ".bad"
CHECKSUM_ALGORITHM = "sha256"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_STEP_DIR_ANY = re.compile(r"^step_(\d{7,})(\.tmp)?$")
# torch.distributed.checkpoint names each rank's shard files __<rank>_<n>.distcp.
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_root(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / CHECKPOINTS_SUBDIR


def step_of(path: Path) -> int:
    return int(_STEP_DIR_ANY.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a step_* directory (not .tmp) with its manifest."""
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / MANIFEST).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest step first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_of)


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


# ------------------------------------------------------------------------------------------
# Which checkpoint to resume from

@dataclasses.dataclass
class ResumePlan:
    """The checkpoints to try, best first: the first one that verifies is loaded.

    may_fall_back: the candidates are this run's own checkpoints, and an older one may
    replace a newest one that fails verification; an explicitly named checkpoint may not.
    skipped: newer directories that are not complete checkpoints, each with the reason."""

    candidates: list[Path]
    may_fall_back: bool
    skipped: list[str]


def own_checkpoints_newest_first(root: Path) -> list[Path]:
    complete = complete_checkpoints(root)
    latest = find_latest(root)
    return ([latest] if latest else []) + [p for p in reversed(complete) if p != latest]


def unfinished_newer_than(root: Path, step: int) -> list[str]:
    """Directories of saves after `step` that never finished, and a marker naming a missing one."""
    reasons = []
    if root.is_dir():
        for path in sorted(root.iterdir(), key=lambda p: p.name):
            if path.is_dir() and _STEP_DIR_ANY.match(path.name) and not is_complete(path) and step_of(path) > step:
                reasons.append(f"{path} is an unfinished save (no {MANIFEST})")
    marker = root / LATEST_MARKER
    if marker.is_file():
        target = root / marker.read_text().strip()
        if not is_complete(target):
            reasons.append(f"{marker} names {target.name}, which is not a complete checkpoint")
    return reasons


def plan_resume(resume: str, root: Path) -> ResumePlan:
    """The checkpoints checkpoint.resume (auto | none | <path>) may load.

    The run's own newest checkpoint (under root) wins over a given path: a preempted and
    requeued job restarts with the same command line, and must continue from where it
    stopped, not go back to the path it started from."""
    if resume == "none":
        return ResumePlan([], False, [])
    own = own_checkpoints_newest_first(root)
    if resume == "auto" or own:
        newest_step = max((step_of(p) for p in own), default=-1)
        return ResumePlan(own, True, unfinished_newer_than(root, newest_step))
    path = Path(resume)
    if is_complete(path):
        return ResumePlan([path], False, [])
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return ResumePlan([latest], False, [])
    if path.is_dir() and _STEP_DIR.match(path.name.removesuffix(TMP_SUFFIX)):
        raise RuntimeError(f"checkpoint.resume={path} is an unfinished checkpoint (no {MANIFEST}): its save "
                           "was interrupted; resume from an older step_* directory next to it")
    raise RuntimeError(f"checkpoint.resume={path} is not a checkpoint (a directory such as step_0000100 "
                       f"holding {MANIFEST}) nor a directory holding any; give one, or checkpoint.resume=auto|none")


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """The first checkpoint plan_resume would try, or None to start fresh."""
    candidates = plan_resume(resume, root).candidates
    return candidates[0] if candidates else None


# ------------------------------------------------------------------------------------------
# Checksums and the manifest

def file_checksum(path: Path, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_entries(ckpt_dir: Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"size", "checksum"}} for the given files of ckpt_dir (read from disk)."""
    return {name: {"size": (ckpt_dir / name).stat().st_size, "checksum": file_checksum(ckpt_dir / name)}
            for name in names}


def checkpoint_file_names(ckpt_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def files_written_by(names: Iterable[str], rank: int, world_size: int) -> list[str]:
    """The files of `names` that `rank` wrote: its own shard files; rank 0 wrote the rest
    (common state, torch and megatron metadata)."""
    def writer(name: str) -> int:
        match = _SHARD_FILE.match(Path(name).name)
        return int(match.group(1)) if match and int(match.group(1)) < world_size else 0

    return [name for name in names if writer(name) == rank]


def split_by_size(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Files dealt out to `parts` ranks, largest first to the least loaded (the same on every rank)."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return shares


def write_manifest(ckpt_dir: Path, extra: dict, entries: Optional[dict[str, dict]] = None) -> dict:
    """Writes the manifest: `entries` as computed by the ranks that wrote the files; any
    other file in the directory is hashed here."""
    entries = dict(entries or {})
    entries.update(file_entries(ckpt_dir, [n for n in checkpoint_file_names(ckpt_dir) if n not in entries]))
    manifest = {"format_version": 1, "checksum_algorithm": CHECKSUM_ALGORITHM,
                "files": dict(sorted(entries.items())), **extra}
    write_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(ckpt_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, the problem)."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None, f"{MANIFEST} is missing: the save did not finish"
    try:
        return json.loads(path.read_text()), None
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{MANIFEST} is unreadable ({err})"


def manifest_sizes(manifest: dict) -> dict[str, int]:
    # Manifests written before checksums map each name to its size.
    return {name: entry if isinstance(entry, int) else entry["size"] for name, entry in manifest["files"].items()}


def file_problem(ckpt_dir: Path, name: str, entry, algorithm: str) -> Optional[str]:
    path = ckpt_dir / name
    expected_size = entry if isinstance(entry, int) else entry["size"]
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected_size:
        return f"{name} has {size} bytes, {expected_size} were written (truncated or overwritten)"
    if isinstance(entry, dict) and "checksum" in entry:
        found = file_checksum(path, algorithm)
        if found != entry["checksum"]:
            return (f"{name} has {algorithm} {found}, {entry['checksum']} was written "
                    "(its contents changed after the save, size unchanged)")
    return None


def verify_files(ckpt_dir: Path, names: Optional[Iterable[str]] = None) -> list[str]:
    """Problems with a checkpoint's files (missing, truncated, changed, no manifest); empty when
    sound. `names`: only these files of the manifest (one rank's share)."""
    manifest, problem = read_manifest(ckpt_dir)
    if problem:
        return [problem]
    files = manifest.get("files", {})
    algorithm = manifest.get("checksum_algorithm", CHECKSUM_ALGORITHM)
    problems = []
    for name in (files if names is None else names):
        try:
            found = file_problem(ckpt_dir, name, files[name], algorithm)
        except OSError as err:
            found = f"{name} is unreadable ({err})"
        if found:
            problems.append(found)
    return problems


def has_checksums(manifest: dict) -> bool:
    return all(isinstance(e, dict) and "checksum" in e for e in manifest.get("files", {}).values())


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------
# Atomic updates, pruning, moving a bad checkpoint aside

def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Deletes complete checkpoints older than the newest keep_last (never `keep`), and stale .tmp dirs.

    `keep` is the checkpoint just saved: its checksums were taken from its files on disk
    after every rank wrote them, so it is the newest checkpoint known to verify, and the
    older ones go only once it exists. Checkpoints moved aside as bad (step_*.bad) are
    neither counted nor deleted."""
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


def move_aside(ckpt: Path) -> Path:
    """Renames a checkpoint that failed verification to step_*.bad (.bad.1, ...): it is kept
    for inspection, but no resume, save or prune treats it as a checkpoint again."""
    target = ckpt.with_name(ckpt.name + BAD_SUFFIX)
    index = 0
    while target.exists():
        index += 1
        target = ckpt.with_name(f"{ckpt.name}{BAD_SUFFIX}.{index}")
    os.rename(ckpt, target)
    return target
