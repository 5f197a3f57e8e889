"""Tokenizers for pretraining: built-in bytes, a local Hugging Face tokenizer.json, or a BPE
trained on the corpus.

megatron-core's GPTDataset duck-types its tokenizer: it reads `vocab_size`, `eod`, `pad`,
`special_tokens_dict` and `unique_identifiers` (the last one is hashed into the name of its
index cache, so two tokenizers that differ must differ there). Both classes here provide
those plus `tokenize(text) -> list[int]` and `detokenize(ids) -> str`.

- `ByteTokenizer()`: UTF-8 bytes 0..255 and an end-of-document token 256 (vocab 257). No
  file, no training; the default.
- `HFTokenizer(path)`: a `tokenizer.json` (or a folder holding one) read with the
  `tokenizers` library, offline. Its end-of-document token is the first of
  `EOD_TOKEN_CANDIDATES` it has.
- `train_bpe(texts, vocab_size, out_path)`: trains a byte-level BPE with `<|endoftext|>`
  and saves it as tokenizer.json (atomically).
- `build_tokenizer(kind, path)`: kind byte | hf | bpe, as in `data.tokenizer`.

`pad` is -1 for both: megatron pads a short sample with it, masks its loss and maps it to
token 0, so it must never be a real token id (megatron itself falls back to -1).

    python -c "from anyexperts.data.tokenizers import ByteTokenizer; print(ByteTokenizer().tokenize('hi'))"
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy

EOD_TEXT = "<|endoftext|>"
# Tried in order when an external tokenizer.json is loaded: GPT-2/NeoX/Qwen, Llama 3,
# Llama 2/Mistral/T5, Gemma.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
PAD_ID = -1
TOKENIZER_KINDS = ("byte", "hf", "bpe")
# 256 byte symbols of the byte-level alphabet plus <|endoftext|>.
MIN_BPE_VOCAB_SIZE = 257

PathLike = Union[str, os.PathLike]


class _SpecialTokenIds:
    """The special-token ids megatron's GPTDataset reads: eod (= eos), bos, pad."""

    _eod: int
    _bos: Optional[int] = None

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    @property
    def pad(self) -> int:
        return PAD_ID


class ByteTokenizer(_SpecialTokenIds):
    """UTF-8 bytes as tokens 0..255, end of document = 256, vocab_size 257."""

    num_byte_tokens = 256

    def __init__(self) -> None:
        self._eod = self.num_byte_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_byte_tokens + 1

    @property
    def special_tokens_dict(self) -> dict:
        # Token ids, not strings: megatron compares these values with the pad id.
        return {"eod_token": self._eod}

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("vocab_size", self.vocab_size),
             ("eod", self.eod)]
        )

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Bytes back to text; eod is shown as <|endoftext|>, pad (-1) is dropped.

        A sample cut from the middle of a document can start or end inside a multi-byte
        character, so invalid bytes become U+FFFD instead of raising.
        """
        ids = numpy.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=numpy.int64)
        pieces: list[str] = []
        start = 0
        # Vectorised: decode each run of byte tokens at once, handle the rare others one by one.
        for position in numpy.flatnonzero((ids < 0) | (ids >= self.num_byte_tokens)).tolist():
            pieces.append(ids[start:position].astype(numpy.uint8).tobytes().decode("utf-8", errors="replace"))
            token_id = int(ids[position])
            if token_id == self._eod:
                pieces.append(EOD_TEXT)
            elif token_id != PAD_ID:
                raise ValueError(f"token id {token_id} is outside the byte tokenizer's vocabulary (0..{self._eod})")
            start = position + 1
        pieces.append(ids[start:].astype(numpy.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eod=256)"


class HFTokenizer(_SpecialTokenIds):
    """A local Hugging Face `tokenizer.json`, loaded with the `tokenizers` library (no hub)."""

    def __init__(self, path: PathLike) -> None:
        from tokenizers import Tokenizer

        self.path = resolve_tokenizer_json(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise ValueError(
                f"{self.path} is not a valid Hugging Face tokenizer.json ({err}); point "
                "data.tokenizer_path at the tokenizer.json saved by `tokenizers` or `transformers`"
            ) from err
        self._content_sha = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # Added tokens may sit above the base vocabulary with gaps: size by the largest id.
        self._vocab_size = max(vocab.values()) + 1
        self._eod_text = next((token for token in EOD_TOKEN_CANDIDATES if token in vocab), None)
        if self._eod_text is None:
            raise ValueError(
                f"{self.path} has no end-of-document token: none of {', '.join(EOD_TOKEN_CANDIDATES)} is "
                f"in its vocabulary. Add one as a special token, e.g. "
                f"`tok.add_special_tokens(['{EOD_TEXT}']); tok.save('{self.path}')` with the tokenizers library"
            )
        self._eod = vocab[self._eod_text]
        self._bos = next((vocab[t] for t in ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]") if t in vocab), None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod_text(self) -> str:
        return self._eod_text

    @property
    def special_tokens_dict(self) -> dict:
        special = {"eod_token": self._eod}
        if self._bos is not None:
            special["bos_token"] = self._bos
        return special

    @property
    def unique_identifiers(self) -> OrderedDict:
        # By content, not path: the same tokenizer.json copied elsewhere reuses the index cache.
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("sha256", self._content_sha),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    @property
    def content_hash(self) -> str:
        """First 16 hex digits of the tokenizer.json's sha256."""
        return self._content_sha

    def tokenize(self, text: str) -> list[int]:
        # No BOS/EOS from a post-processor: documents are separated by eod in prepare.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids if int(i) != PAD_ID], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod_text}={self.eod})"


def resolve_tokenizer_json(path: PathLike) -> Path:
    """A tokenizer.json path, given either the file or a folder that holds one."""
    resolved = Path(os.path.expanduser(str(path))).absolute()
    if resolved.is_dir():
        resolved = resolved / "tokenizer.json"
    if not resolved.is_file():
        raise FileNotFoundError(
            f"tokenizer file {resolved} does not exist; set data.tokenizer_path to a Hugging Face "
            "tokenizer.json (or a folder holding one), or use data.tokenizer=byte"
        )
    return resolved


def train_bpe(text_iter: Iterable[str], vocab_size: int, out_path: PathLike) -> HFTokenizer:
    """Trains a byte-level BPE on `text_iter` and saves it at `out_path` as tokenizer.json.

    Byte-level means every string round-trips exactly and no token is unknown. The result
    has `<|endoftext|>` as id 0 and the 256 byte symbols in its base alphabet, so
    `vocab_size` must be at least 257; a small corpus that runs out of pairs to merge
    gives a smaller vocabulary. The file appears atomically (temp file + rename).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"data.bpe_vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_BPE_VOCAB_SIZE} (256 byte symbols + {EOD_TEXT}); use e.g. 4096"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_iter, trainer=trainer)
    out_path = Path(os.path.expanduser(str(out_path))).absolute()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(tmp_path))
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return HFTokenizer(out_path)


def build_tokenizer(kind: str, path: Optional[PathLike] = None) -> Union[ByteTokenizer, HFTokenizer]:
    """The tokenizer for `data.tokenizer` = kind: byte (path unused), hf or bpe (path = a tokenizer.json)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("hf", "bpe"):
        if path is None:
            what = "a Hugging Face tokenizer.json" if kind == "hf" else "the tokenizer.json trained by train_bpe"
            raise ValueError(f"data.tokenizer={kind} needs data.tokenizer_path: set it to {what}")
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={kind!r} is not supported; choose one of {', '.join(TOKENIZER_KINDS)}")
