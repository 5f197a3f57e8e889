"""The digits image-text corpus: image tokens and a caption in one token stream.

The 1,797 8x8 handwritten digits that scikit-learn ships (`sklearn.datasets.load_digits`,
17 grey levels 0..16, no download), each written as one document:

    <boi> p_0 p_1 ... p_63 <eoi> d i g i t ' ' 7 <eod>        (74 tokens)

pixels row by row. Token ids (`DigitsTokenizer`, vocabulary 276):

    0..255    text: UTF-8 bytes, as ByteTokenizer          modality text
    256       end of document (eod)                          modality text
    257..273  a pixel of grey level g: PIXEL_BASE + g        modality image
    274, 275  begin / end of image markers                   modality image

The modality of a token is a pure function of its id (`modality_of_tokens`), so it lines up
with the tokens after any packing into sequences, micro-batching, expert parallelism or
resume: nothing is stored beside the tokens.

The documents are shuffled once with a fixed seed (`SHUFFLE_SEED`) before they are
written, so megatron's split by document (data.split, e.g. "90,10,0") is a split by image:
no validation image is ever trained on.

    python -c "from anyexperts.data.digits import prepare_digits; print(prepare_digits('/tmp/d/text_document').summary())"
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

import numpy
import torch

from anyexperts.data.tokenizers import ByteTokenizer
from anyexperts.moe.token_info import MODALITY_NAMES

NUM_GREY_LEVELS = 17
IMAGE_SIDE = 8
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
PIXEL_BASE = 257
BEGIN_IMAGE = PIXEL_BASE + NUM_GREY_LEVELS  # 274
END_IMAGE = BEGIN_IMAGE + 1  # 275
VOCAB_SIZE = END_IMAGE + 1
CAPTION_PREFIX = "digit "
SHUFFLE_SEED = 0
TEXT, IMAGE = MODALITY_NAMES.index("text"), MODALITY_NAMES.index("image")
SOURCE_NAME = "sklearn.datasets.load_digits"


class DigitsTokenizer(ByteTokenizer):
    """Bytes for text, eod 256, then 17 pixel grey levels and the two image markers."""

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("vocab_size", self.vocab_size), ("eod", self.eod), ("pixel_base", PIXEL_BASE)])

    def tokenize_image(self, image: numpy.ndarray) -> list[int]:
        levels = numpy.asarray(image, dtype=numpy.int64).reshape(-1)
        return [BEGIN_IMAGE, *(PIXEL_BASE + levels).tolist(), END_IMAGE]

    def tokenize_sample(self, image: numpy.ndarray, label: int) -> list[int]:
        return self.tokenize_image(image) + self.tokenize(f"{CAPTION_PREFIX}{int(label)}") + [self.eod]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text as ByteTokenizer shows it; image tokens as <boi>, <eoi> and <pG> for grey level G."""
        pieces, text_run = [], []
        for token_id in (int(i) for i in ids):
            if token_id < PIXEL_BASE:
                text_run.append(token_id)
                continue
            if text_run:
                pieces.append(super().detokenize(text_run))
                text_run = []
            if token_id == BEGIN_IMAGE:
                pieces.append("<boi>")
            elif token_id == END_IMAGE:
                pieces.append("<eoi>")
            elif token_id < BEGIN_IMAGE:
                pieces.append(f"<p{token_id - PIXEL_BASE}>")
            else:
                raise ValueError(f"token id {token_id} is outside the digits vocabulary (0..{VOCAB_SIZE - 1})")
        if text_run:
            pieces.append(super().detokenize(text_run))
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"DigitsTokenizer(vocab_size={VOCAB_SIZE}, eod={self.eod}, pixels={PIXEL_BASE}..{BEGIN_IMAGE - 1})"


def modality_of_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The modality index (MODALITY_NAMES: 0 text, 1 image) of every token id, same shape."""
    return (tokens >= PIXEL_BASE).to(torch.int64)


def load_digits_arrays() -> tuple[numpy.ndarray, numpy.ndarray]:
    """(images [N, 8, 8] int64 grey levels, labels [N] int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(f"data.source=digits reads {SOURCE_NAME}, but scikit-learn is not installed ({err}); "
                          "install it with `pip install scikit-learn`") from None
    bunch = load_digits()
    return bunch.images.astype(numpy.int64), bunch.target.astype(numpy.int64)


def check_digits_arrays(images, labels) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The arrays as int64 [N, 8, 8] and [N]; ValueError naming what is wrong and the fix."""
    images, labels = numpy.asarray(images), numpy.asarray(labels)
    if images.ndim == 2 and images.shape[1] == NUM_PIXELS:
        images = images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"digit images have shape {images.shape}; they must be [N, 8, 8] (or [N, 64]) grey levels")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"digit labels have shape {labels.shape}; give one label per image ({images.shape[0]})")
    if images.shape[0] < 2:
        raise ValueError(f"{images.shape[0]} digit images: a train and a validation split need at least 2")
    if not numpy.all(numpy.isfinite(images)) or not numpy.array_equal(images, numpy.round(images)):
        raise ValueError("digit images must hold whole grey levels 0..16 (integers); quantise them first")
    if images.min() < 0 or images.max() >= NUM_GREY_LEVELS:
        raise ValueError(f"digit images hold grey levels {images.min()}..{images.max()}, outside 0..16; "
                         "rescale them to 17 levels (e.g. round(x / x.max() * 16))")
    if not numpy.array_equal(labels, numpy.round(labels)) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"digit labels must be integers 0..9, got {labels.min()}..{labels.max()}")
    return images.astype(numpy.int64), labels.astype(numpy.int64)


def prepare_digits(output_prefix, *, images=None, labels=None):
    """Writes `<output_prefix>.bin/.idx/.info.json`: one document per digit (module docstring),
    in the order of a fixed shuffle. images/labels default to scikit-learn's digits."""
    from anyexperts.data.prepare import PrepareStats, indexed_output, token_dtype

    if images is None and labels is None:
        images, labels = load_digits_arrays()
    elif images is None or labels is None:
        raise ValueError("prepare_digits needs both images and labels, or neither (scikit-learn's digits)")
    images, labels = check_digits_arrays(images, labels)
    tokenizer = DigitsTokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    output_prefix = os.path.abspath(os.path.expanduser(str(output_prefix)))
    stats = PrepareStats(output_prefix, 0, 0, numpy.dtype(dtype).name, num_input_files=1)
    order = numpy.random.default_rng(SHUFFLE_SEED).permutation(len(labels))
    with indexed_output(output_prefix, dtype) as (builder, tmp_prefix):
        for index in order.tolist():
            tokens = numpy.asarray(tokenizer.tokenize_sample(images[index], labels[index]), dtype=dtype)
            builder.add_document(tokens, [len(tokens)])
            stats.num_documents += 1
            stats.num_tokens += len(tokens)
        _write_info(f"{tmp_prefix}.info.json", stats, tokenizer)
    stats.files = [f"{output_prefix}{suffix}" for suffix in (".bin", ".info.json", ".idx")]
    return stats


def _write_info(path: str, stats, tokenizer: DigitsTokenizer) -> None:
    # The same "tokenizer" record as the text corpora's, so a run with another tokenizer is refused.
    info = {"tokenizer": dict(tokenizer.unique_identifiers), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "source": SOURCE_NAME, "shuffle_seed": SHUFFLE_SEED, "num_documents": stats.num_documents,
            "num_tokens": stats.num_tokens, "dtype": stats.dtype}
    with open(path, "w") as handle:
        json.dump(info, handle, indent=2)


def caption_positions(tokens_BS: torch.Tensor) -> torch.Tensor:
    """Bool [B, S]: where the next token is a caption's digit, i.e. the token at s ends the
    caption prefix "digit " that follows an <eoi>. A prefix cut by the sample start is skipped."""
    prefix = [END_IMAGE, *ByteTokenizer().tokenize(CAPTION_PREFIX)]
    length = len(prefix)
    batch, seq = tokens_BS.shape
    hit_BS = torch.zeros(batch, seq, dtype=torch.bool, device=tokens_BS.device)
    if seq < length:
        return hit_BS
    windows_BWL = tokens_BS.unfold(1, length, 1)  # window w covers [w, w + length)
    expected_L = torch.tensor(prefix, dtype=tokens_BS.dtype, device=tokens_BS.device)
    hit_BS[:, length - 1:] = (windows_BWL == expected_L).all(-1)
    return hit_BS


def digit_token_ids() -> list[int]:
    return ByteTokenizer().tokenize("0123456789")

