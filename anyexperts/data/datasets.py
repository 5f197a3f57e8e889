"""megatron-core GPT datasets (train, valid, test) over one prepared `.bin/.idx` prefix.

    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=128, split="95,5,0",
                                            seed=1234, num_samples=(3200, 64, 0))

The builder is megatron's BlendedMegatronDatasetBuilder with GPTDataset; no project code
stands between a sample and megatron.

What a sample holds (`train[i]`, a dict of CPU tensors):
- `tokens`: int64 [seq_length], the model input;
- `labels`: int64 [seq_length], `tokens` shifted left by one (each sample reads
  seq_length + 1 consecutive tokens of the concatenated, shuffled documents);
- `loss_mask`: float32 [seq_length], 1 except where a short sample was padded;
- `position_ids`: int64 [seq_length], 0..seq_length-1 (not reset at eod);
- `attention_mask`: bool [1, seq_length, seq_length], True = masked, only with
  `create_attention_mask=True`. Off by default: megatron's attention builds the causal
  mask itself when given None, and the dense mask costs seq_length^2 per sample.
Samples cross document boundaries; documents are separated by the eod token and attend to
each other (no position/mask reset, eod not masked from the loss).

Splits are by document (megatron's `--split`): "95,5,0" gives the first 95% of the
documents, in file order, to train, the next 5% to valid, and no test set (test is None).
A split with weight > 0 but no document is an error here, not an empty dataset.

Index cache: megatron saves each split's document/sample/shuffle indices as .npy files
named by an MD5 of (prefix, num_samples, split, seed, seq_length, tokenizer identity)
in `cache_dir` (default: `<folder of the prefix>/index_cache/`), and reuses them when the
same description comes again; every new num_samples adds files. With torch.distributed
initialised, rank 0 builds and saves them, all ranks wait at a barrier, then the other
ranks load them: so every rank must call this (it has collectives) and `cache_dir` must be
on a filesystem all ranks see.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Optional, Sequence

SPLIT_NAMES = ("train", "valid", "test")
# .idx layout (megatron indexed_dataset._IndexWriter): 9-byte magic, u64 version, u8 dtype
# code, u64 sequence count, ...
_IDX_SEQUENCE_COUNT_OFFSET = 9 + 8 + 1


def build_gpt_datasets(
    data_prefix: str,
    tokenizer: Any,
    *,
    seq_length: int,
    split: str,
    seed: int,
    num_samples: Sequence[Optional[int]],
    cache_dir: Optional[str] = None,
    create_attention_mask: bool = False,
) -> tuple[Any, Any, Any]:
    """(train, valid, test) GPTDatasets; a split of weight 0 is None.

    num_samples: samples per split (train, valid, test); a split is repeated over epochs
    (reshuffled each time) until it has that many; None = exactly one epoch.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    data_prefix = os.path.abspath(os.path.expanduser(str(data_prefix)))
    missing = [f"{data_prefix}{s}" for s in (".bin", ".idx") if not os.path.isfile(f"{data_prefix}{s}")]
    if missing:
        raise FileNotFoundError(
            f"prepared data not found: {' and '.join(missing)} missing. Prepare it with `python "
            f"tools/prepare_data.py --input <corpus> --output-prefix {data_prefix}` or set data.data_prefix "
            "to an existing prefix (without .bin/.idx)"
        )
    if seq_length < 1:
        raise ValueError(f"model.seq_length={seq_length} must be >= 1")
    num_samples = list(num_samples)
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise ValueError(f"num_samples={tuple(num_samples)} must be three counts >= 0 (train, valid, test)")
    split_matrix = _split_matrix(split)
    _check_every_split_has_documents(data_prefix, split, split_matrix)

    cache_dir = cache_dir or os.path.join(os.path.dirname(data_prefix), "index_cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        path_to_cache=os.path.abspath(os.path.expanduser(str(cache_dir))),
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    # Every rank reads its own batches (data parallel over all ranks, TP=1 on CPU), so every
    # rank builds; megatron still builds on rank 0 first and barriers, so that the others
    # find the index cache written.
    builder = BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test


def _split_matrix(split: str) -> list:
    """megatron's split matrix for `split`, after checking what megatron's parser does not."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    fix = 'use up to three comma-separated weights >= 0 for train, valid, test, e.g. "95,5,0"'
    try:
        weights = [float(part) for part in str(split).split(",")]
    except ValueError:
        raise ValueError(f"data.split={split!r} is not a list of numbers; {fix}") from None
    if len(weights) > 3 or any(w < 0 for w in weights):
        raise ValueError(f"data.split={split!r}: {fix}")
    if weights[0] <= 0:
        raise ValueError(f"data.split={split!r} gives train no data; {fix}")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))


def _check_every_split_has_documents(data_prefix: str, split: str, split_matrix: list) -> None:
    with open(f"{data_prefix}.idx", "rb") as handle:
        handle.seek(_IDX_SEQUENCE_COUNT_OFFSET)
        (num_documents,) = struct.unpack("<Q", handle.read(8))
    for name, bookends in zip(SPLIT_NAMES, split_matrix):
        if bookends is None:
            continue
        # The same rounding as megatron's builder (_build_megatron_dataset_splits).
        begin, end = (int(round(b * float(num_documents))) for b in bookends)
        if end <= begin:
            raise ValueError(
                f"data.split={split!r} leaves the {name} split no documents: {data_prefix} has {num_documents} "
                f"(splits are by document: one per .txt file or JSONL line). Give the corpus more documents, "
                f"raise the {name} weight, or set its weight to 0 to have no {name} set"
            )
