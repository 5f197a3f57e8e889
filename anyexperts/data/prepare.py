"""Tokenizes a text corpus into megatron-core's indexed format (`<prefix>.bin` + `.idx`),
and finds or makes the prepared data a run's `data` config asks for.

- `prepare_corpus(input_path, output_prefix, tokenizer)`: every document of the corpus
  (layout: `corpus.iter_documents`) tokenized and followed by the tokenizer's eod, one
  megatron sequence per document, written with megatron's IndexedDatasetBuilder. Tokens
  are uint16 when the vocabulary allows (megatron's `DType.optimal_dtype`), else int32.
  The files are written under a temporary prefix and renamed into place, `.idx` last, so
  a prefix whose `.bin` and `.idx` both exist is always complete. A small
  `<prefix>.info.json` records the tokenizer, so that a run with another tokenizer is
  refused instead of training on mismatched ids.
- `ensure_prepared(data_cfg)`: (data_prefix, tokenizer) for a `DataConfig`, preparing into
  `<cache_dir>/prepared/...` on first use and reusing it after (see its docstring). Ranks
  that call it together take turns through a file lock; the first prepares, the others
  reuse; still, calling it on rank 0 before a barrier avoids idle waiting.

Command line: `python tools/prepare_data.py --input DIR_OR_JSONL --output-prefix PREFIX`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Optional, Union

import numpy

from anyexperts.data.corpus import (
    BUNDLED_CORPORA,
    Document,
    bundled_corpus,
    bundled_corpus_dir,
    file_lock,
    iter_documents,
    list_input_files,
)
from anyexperts.data.tokenizers import (
    TOKENIZER_KINDS,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    resolve_tokenizer_json,
    train_bpe,
)

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Tokenizer = Union[ByteTokenizer, HFTokenizer]

DATA_SOURCES = ("shakespeare", "text", "prepared", "canterbury", "digits")
PREPARED_NAME = "text_document"
TOKENIZER_FILE = "tokenizer.json"
# Inputs smaller than this tokenize in about a second: no progress bar.
PROGRESS_MIN_BYTES = 1 << 20
# Documents tokenized together (bounded in count and bytes to bound memory).
TOKENIZE_BATCH_DOCUMENTS = 256
TOKENIZE_BATCH_BYTES = 16 << 20


@dataclass
class PrepareStats:
    output_prefix: str
    num_documents: int  # written, each followed by eod
    num_tokens: int  # including the eod tokens
    dtype: str  # token dtype in .bin: uint16 or int32
    files: list[str] = field(default_factory=list)  # the files written: .bin, .info.json, .idx
    num_input_files: int = 0
    num_empty_documents: int = 0  # skipped: empty or whitespace only

    def summary(self) -> str:
        skipped = f", skipped {self.num_empty_documents} empty" if self.num_empty_documents else ""
        return (
            f"{self.num_documents} documents ({self.num_input_files} input files{skipped}), "
            f"{self.num_tokens} tokens as {self.dtype} -> {self.output_prefix}.bin/.idx"
        )


def token_dtype(vocab_size: int) -> type:
    """megatron's choice of token dtype for a vocabulary: uint16 below 65500, else int32."""
    if vocab_size - 1 > numpy.iinfo(numpy.int32).max:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit megatron's token storage (int32 holds ids up to "
            f"{numpy.iinfo(numpy.int32).max}); use a tokenizer with a smaller vocabulary"
        )
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def is_prepared(prefix: PathLike) -> bool:
    return os.path.isfile(f"{prefix}.bin") and os.path.isfile(f"{prefix}.idx")


def prepare_corpus(
    input_path: PathLike,
    output_prefix: PathLike,
    tokenizer: Tokenizer,
    *,
    jsonl_field: str = "text",
    show_progress: bool = True,
    exclude_names: Collection[str] = (),
) -> PrepareStats:
    """Writes `<output_prefix>.bin/.idx` (+ `.info.json`) from the corpus at `input_path`.

    Empty documents are skipped and counted; a corpus with no tokens at all, a missing or
    empty path, bad JSON lines, a missing `jsonl_field` and non-UTF-8 bytes raise
    ValueError / FileNotFoundError naming the file (and line or byte offset) and the fix.
    `exclude_names`: file names left out of a directory corpus.
    """
    input_files = list_input_files(input_path, exclude_names=exclude_names)
    dtype = token_dtype(tokenizer.vocab_size)
    # Heavy (megatron.core imports ~7 s, in indexed_output): only once the input looks usable.
    from tqdm import tqdm

    output_prefix = os.path.abspath(os.path.expanduser(str(output_prefix)))
    stats = PrepareStats(output_prefix, 0, 0, numpy.dtype(dtype).name, num_input_files=len(input_files))
    total_bytes = sum(path.stat().st_size for path in input_files)
    with indexed_output(output_prefix, dtype) as (builder, tmp_prefix):
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {Path(input_path).name}",
            disable=not show_progress or total_bytes < PROGRESS_MIN_BYTES,
        ) as progress:
            documents = iter_documents(input_path, jsonl_field=jsonl_field, exclude_names=exclude_names)
            for batch in _batches(documents):
                for document, token_ids in zip(batch, _tokenize_batch(tokenizer, batch)):
                    progress.update(document.num_bytes)
                    if len(token_ids) == 0:
                        stats.num_empty_documents += 1
                        continue
                    tokens = numpy.empty(len(token_ids) + 1, dtype=numpy.int64)
                    tokens[:-1] = token_ids
                    tokens[-1] = tokenizer.eod
                    _check_token_range(tokens, tokenizer, document.source)
                    builder.add_document(tokens.astype(dtype), [len(tokens)])
                    stats.num_documents += 1
                    stats.num_tokens += len(tokens)
        if stats.num_documents == 0:
            raise ValueError(
                f"{input_path} has no text: all {stats.num_empty_documents} documents are empty or whitespace; "
                "point data.input_path (--input) at a corpus with text"
            )
        _write_info(f"{tmp_prefix}.info.json", stats, tokenizer, input_path)
    stats.files = [f"{output_prefix}{suffix}" for suffix in (".bin", ".info.json", ".idx")]
    return stats


@contextlib.contextmanager
def indexed_output(output_prefix: str, dtype) -> Iterator[tuple[Any, str]]:
    """(builder, tmp_prefix) for writing `<output_prefix>.bin/.idx/.info.json`: the body adds the
    documents and writes `<tmp_prefix>.info.json`; on success the index is finalised and the
    files are published together (_publish), on any error the temporary files are removed."""
    from megatron.core.datasets import indexed_dataset

    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    # Hidden and unique per writer, so concurrent writers and readers never see it.
    tmp_prefix = os.path.join(
        os.path.dirname(output_prefix), f".{os.path.basename(output_prefix)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    builder = indexed_dataset.IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    try:
        yield builder, tmp_prefix
        builder.finalize(f"{tmp_prefix}.idx")
        _publish(tmp_prefix, output_prefix)
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx", ".info.json"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
        raise


def _batches(documents: Iterator[Document]) -> Iterator[list[Document]]:
    """Groups documents so that a Hugging Face tokenizer can encode them on all cores at once."""
    batch: list[Document] = []
    num_batch_bytes = 0
    for document in documents:
        batch.append(document)
        num_batch_bytes += document.num_bytes
        if len(batch) >= TOKENIZE_BATCH_DOCUMENTS or num_batch_bytes >= TOKENIZE_BATCH_BYTES:
            yield batch
            batch, num_batch_bytes = [], 0
    if batch:
        yield batch


def _tokenize_batch(tokenizer: Tokenizer, batch: list[Document]) -> list[list[int]]:
    """Token ids per document; empty (or whitespace-only) documents give []."""
    texts = [document.text for document in batch]
    tokenize_batch = getattr(tokenizer, "tokenize_batch", None)
    all_ids = tokenize_batch(texts) if tokenize_batch is not None else [tokenizer.tokenize(t) for t in texts]
    return [ids if text.strip() else [] for text, ids in zip(texts, all_ids)]


def _check_token_range(tokens: numpy.ndarray, tokenizer: Tokenizer, source: str) -> None:
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= tokenizer.vocab_size:
        raise ValueError(
            f"{source}: {tokenizer!r} produced token id {low if low < 0 else high}, outside its vocabulary "
            f"0..{tokenizer.vocab_size - 1}; the tokenizer is inconsistent, use another data.tokenizer"
        )


def _write_info(path: str, stats: PrepareStats, tokenizer: Tokenizer, input_path: PathLike) -> None:
    info = {
        "tokenizer": dict(tokenizer.unique_identifiers),
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "input_path": os.path.abspath(os.path.expanduser(str(input_path))),
        **{key: value for key, value in asdict(stats).items() if key not in ("files", "output_prefix")},
    }
    with open(path, "w") as handle:
        json.dump(info, handle, indent=2)


def _publish(tmp_prefix: str, output_prefix: str) -> None:
    """Renames the temporary files into place so that no moment shows a stale complete pair."""
    # An older .idx next to the new .bin would look complete: take it away first.
    Path(f"{output_prefix}.idx").unlink(missing_ok=True)
    os.replace(f"{tmp_prefix}.bin", f"{output_prefix}.bin")
    os.replace(f"{tmp_prefix}.info.json", f"{output_prefix}.info.json")
    os.replace(f"{tmp_prefix}.idx", f"{output_prefix}.idx")


def _recorded_tokenizer(prefix: PathLike) -> Optional[dict]:
    """The tokenizer identity in `<prefix>.info.json`; None for data prepared elsewhere
    (e.g. by Megatron-LM's tools), which has nothing to compare with."""
    info_path = Path(f"{prefix}.info.json")
    return json.loads(info_path.read_text()).get("tokenizer") if info_path.is_file() else None


def _identity(tokenizer: Tokenizer) -> dict:
    return json.loads(json.dumps(dict(tokenizer.unique_identifiers)))  # as read back from JSON


def check_tokenizer_matches(prefix: PathLike, tokenizer: Tokenizer) -> None:
    """Refuses a tokenizer other than the one the data was prepared with, when that is recorded."""
    recorded, current = _recorded_tokenizer(prefix), _identity(tokenizer)
    if recorded is not None and recorded != current:
        raise ValueError(
            f"{prefix} was prepared with tokenizer {recorded}, but the run uses {current}; set data.tokenizer "
            "and data.tokenizer_path to the tokenizer the data was prepared with, or prepare the data again"
        )


def prepare_tokenizer(
    kind: str,
    *,
    input_path: PathLike,
    out_dir: PathLike,
    tokenizer_path: Optional[PathLike] = None,
    bpe_vocab_size: int = 4096,
    jsonl_field: str = "text",
    exclude_names: Collection[str] = (),
) -> Tokenizer:
    """The tokenizer for preparing `input_path`: byte, hf (tokenizer_path), or bpe.

    bpe reuses `tokenizer_path` or `<out_dir>/tokenizer.json` when it exists, else trains
    one on the corpus with `bpe_vocab_size` and saves it there.
    """
    if kind != "bpe":
        return build_tokenizer(kind, tokenizer_path)
    target = Path(tokenizer_path) if tokenizer_path is not None else Path(out_dir) / TOKENIZER_FILE
    target = Path(os.path.expanduser(str(target))).absolute()
    if target.is_dir():
        target = target / TOKENIZER_FILE
    if target.is_file():
        log.info("Reusing the BPE tokenizer %s", target)
        return HFTokenizer(target)
    log.info("Training a byte-level BPE (vocab %d) on %s -> %s", bpe_vocab_size, input_path, target)
    texts = (doc.text for doc in iter_documents(input_path, jsonl_field=jsonl_field, exclude_names=exclude_names))
    return train_bpe(texts, bpe_vocab_size, target)


def ensure_prepared(data_cfg: Any, *, show_progress: bool = True) -> tuple[str, Tokenizer]:
    """(data_prefix, tokenizer) for a DataConfig-like object, preparing data when needed.

    - source=shakespeare or canterbury (a corpus of `corpus.BUNDLED_CORPORA`): its cached
      texts (fetched once), prepared into `<cache_dir>/prepared/<name>-<tokenizer>/text_document`;
      the tokenizer part is `byte`, `bpe-<vocab>` or `hf-<hash of tokenizer.json>`.
    - source=text: `data.input_path` prepared into
      `<cache_dir>/prepared/<name>-<hash>/text_document`, the hash covering the absolute
      path, every file's size and mtime, the JSONL field and the tokenizer, so an edited
      corpus is prepared anew.
    - source=digits: scikit-learn's bundled 8x8 digits, image tokens then a caption
      (anyexperts/data/digits.py), prepared into `<cache_dir>/prepared/digits/text_document`;
      the tokenizer is its DigitsTokenizer (data.tokenizer must stay byte).
    - source=prepared: `data.data_prefix` as is (both files must exist). For hf/bpe the
      tokenizer is `data.tokenizer_path`, else the tokenizer.json next to the prefix.
    tokenizer=bpe trains on the corpus and keeps tokenizer.json in the prepared folder.
    A prefix whose .bin and .idx exist, made with the same tokenizer, is reused without
    reading the corpus.
    """
    kind = data_cfg.tokenizer
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"data.tokenizer={kind!r} is not supported; choose one of {', '.join(TOKENIZER_KINDS)}")
    if data_cfg.source == "prepared":
        return _use_prepared(data_cfg)
    if data_cfg.source not in DATA_SOURCES:
        raise ValueError(f"data.source={data_cfg.source!r} is not supported; choose one of {', '.join(DATA_SOURCES)}")
    if data_cfg.source == "digits":
        return _ensure_digits_prepared(data_cfg)

    cache_dir = resolve_cache_dir(data_cfg.cache_dir)
    tokenizer_path = getattr(data_cfg, "tokenizer_path", None)
    if kind == "bpe" and tokenizer_path:
        log.warning("data.tokenizer_path=%s is ignored: tokenizer=bpe trains its own next to the prepared data "
                    "(for an existing tokenizer use tokenizer=hf)", tokenizer_path)
    # The folder name says which tokenizer made the data, so another one never reuses it.
    hf_tokenizer = build_tokenizer("hf", tokenizer_path) if kind == "hf" else None
    if hf_tokenizer is not None:
        tokenizer_tag = f"hf-{hf_tokenizer.content_hash[:10]}"
    elif kind == "bpe":
        tokenizer_tag = f"bpe-{data_cfg.bpe_vocab_size}"
    else:
        tokenizer_tag = "byte"
    jsonl_field = getattr(data_cfg, "jsonl_field", "text")
    if data_cfg.source in BUNDLED_CORPORA:
        corpus = bundled_corpus(data_cfg.source)
        input_path, exclude_names = bundled_corpus_dir(corpus.name, cache_dir), corpus.non_text_files
        folder_name = f"{corpus.name}-{tokenizer_tag}"
    else:
        if not data_cfg.input_path:
            raise ValueError("data.source=text needs data.input_path: a .jsonl file, a .txt file or a directory of them")
        input_path, exclude_names = Path(os.path.expanduser(str(data_cfg.input_path))).absolute(), ()
        folder_name = f"{_safe_name(input_path)}-{_corpus_key(input_path, jsonl_field, tokenizer_tag)}"

    out_dir = cache_dir / "prepared" / folder_name
    prefix = out_dir / PREPARED_NAME
    with file_lock(out_dir / ".lock"):
        tokenizer = hf_tokenizer or prepare_tokenizer(
            kind, input_path=input_path, out_dir=out_dir, bpe_vocab_size=data_cfg.bpe_vocab_size,
            jsonl_field=jsonl_field, exclude_names=exclude_names,
        )
        # A retrained BPE (its tokenizer.json was deleted) may differ: then prepare again.
        if is_prepared(prefix) and _recorded_tokenizer(prefix) in (None, _identity(tokenizer)):
            log.info("Reusing prepared data %s", prefix)
        else:
            stats = prepare_corpus(input_path, prefix, tokenizer, jsonl_field=jsonl_field,
                                   show_progress=show_progress, exclude_names=exclude_names)
            log.info("Prepared %s", stats.summary())
    return str(prefix), tokenizer


def _ensure_digits_prepared(data_cfg: Any) -> tuple[str, Tokenizer]:
    """source=digits: scikit-learn's digits as image + caption documents (data/digits.py),
    in `<cache_dir>/prepared/digits/text_document`, with their own tokenizer."""
    from anyexperts.data.digits import DigitsTokenizer, prepare_digits

    if data_cfg.tokenizer != "byte":
        raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}: data.source=digits brings its own tokenizer "
                         "(caption bytes + pixel tokens); leave data.tokenizer=byte")
    tokenizer = DigitsTokenizer()
    out_dir = resolve_cache_dir(data_cfg.cache_dir) / "prepared" / "digits"
    prefix = out_dir / PREPARED_NAME
    with file_lock(out_dir / ".lock"):
        if is_prepared(prefix) and _recorded_tokenizer(prefix) in (None, _identity(tokenizer)):
            log.info("Reusing prepared data %s", prefix)
        else:
            log.info("Prepared %s", prepare_digits(prefix).summary())
    return str(prefix), tokenizer


def ensure_bundled_prepared(name: str, tokenizer: Tokenizer, cache_dir: Optional[str], *,
                            show_progress: bool = True) -> str:
    """The prefix of bundled corpus `name` tokenized with a run's own `tokenizer`, for
    evaluating the run on it: `<cache_dir>/prepared/<name>-byte/` for the byte tokenizer
    (the folder `data.source=<name>` uses), `<name>-hf-<hash of tokenizer.json>/` for any
    other (a BPE trained on the training corpus included), so ids always mean what the
    model learnt. Prepared once, then reused; ranks take turns through a file lock.
    """
    corpus = bundled_corpus(name)
    tag = "byte" if isinstance(tokenizer, ByteTokenizer) else f"hf-{tokenizer.content_hash[:10]}"
    out_dir = resolve_cache_dir(cache_dir) / "prepared" / f"{corpus.name}-{tag}"
    prefix = out_dir / PREPARED_NAME
    with file_lock(out_dir / ".lock"):
        if is_prepared(prefix) and _recorded_tokenizer(prefix) in (None, _identity(tokenizer)):
            return str(prefix)
        input_path = bundled_corpus_dir(corpus.name, resolve_cache_dir(cache_dir))
        stats = prepare_corpus(input_path, prefix, tokenizer, show_progress=show_progress,
                               exclude_names=corpus.non_text_files)
        log.info("Prepared %s", stats.summary())
    return str(prefix)


def resolve_cache_dir(cache_dir: Optional[str]) -> Path:
    """data.cache_dir with `~` expanded; None means $ANYEXPERTS_CACHE or ~/.cache/anyexperts."""
    if cache_dir is None:
        cache_dir = os.environ.get("ANYEXPERTS_CACHE", "~/.cache/anyexperts")
    if "${" in str(cache_dir):
        raise ValueError(
            f"data.cache_dir={cache_dir!r} is an unresolved OmegaConf interpolation; resolve the config "
            "(OmegaConf.to_object / to_container(resolve=True)) before preparing data, or set data.cache_dir"
        )
    return Path(os.path.expanduser(str(cache_dir))).absolute()


def _use_prepared(data_cfg: Any) -> tuple[str, Tokenizer]:
    if not data_cfg.data_prefix:
        raise ValueError(
            "data.source=prepared needs data.data_prefix: the path of the .bin/.idx pair without the extension"
        )
    prefix = os.path.abspath(os.path.expanduser(str(data_cfg.data_prefix)))
    prefix = re.sub(r"\.(bin|idx)$", "", prefix)
    if not is_prepared(prefix):
        missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not os.path.isfile(f"{prefix}{s}")]
        raise FileNotFoundError(
            f"prepared data not found: {' and '.join(missing)} missing. Run `python tools/prepare_data.py "
            f"--input <corpus> --output-prefix {prefix}` or set data.data_prefix to an existing prefix"
        )
    kind = data_cfg.tokenizer
    if kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        tokenizer_path = data_cfg.tokenizer_path or os.path.join(os.path.dirname(prefix), TOKENIZER_FILE)
        try:
            resolve_tokenizer_json(tokenizer_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"data.tokenizer={kind} with data.source=prepared needs the tokenizer the data was prepared with: "
                f"{tokenizer_path} does not exist; set data.tokenizer_path to its tokenizer.json"
            ) from None
        tokenizer = HFTokenizer(tokenizer_path)
    check_tokenizer_matches(prefix, tokenizer)
    return prefix, tokenizer


def _safe_name(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "corpus"


def _corpus_key(input_path: Path, jsonl_field: str, tokenizer_tag: str) -> str:
    files = list_input_files(input_path)
    description = {
        "input_path": str(input_path),
        "files": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "jsonl_field": jsonl_field,
        "tokenizer": tokenizer_tag,
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:10]
