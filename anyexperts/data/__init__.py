"""The data path of a run: corpus -> tokenizer -> megatron indexed data -> GPT datasets.

    prefix, tokenizer = ensure_prepared(cfg.data)          # prepares into the cache once
    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=..., split=cfg.data.split,
                                            seed=..., num_samples=(n_train, n_valid, n_test))

Modules: `tokenizers` (byte, Hugging Face tokenizer.json, BPE training), `corpus` (the
Shakespeare and Canterbury downloads and reading .txt/.jsonl corpora), `prepare` (tokenize into .bin/.idx,
the prepared-data cache), `datasets` (megatron GPTDataset splits). Command line:
`python tools/prepare_data.py --help`. megatron-core is imported only when data is written
or datasets are built, so importing this package is cheap.
"""

from anyexperts.data.corpus import BUNDLED_CORPORA, bundled_corpus_dir, iter_documents, shakespeare_texts_dir
from anyexperts.data.datasets import build_gpt_datasets
from anyexperts.data.prepare import PrepareStats, ensure_bundled_prepared, ensure_prepared, prepare_corpus
from anyexperts.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer, train_bpe

__all__ = [
    "BUNDLED_CORPORA",
    "ByteTokenizer",
    "HFTokenizer",
    "PrepareStats",
    "build_gpt_datasets",
    "bundled_corpus_dir",
    "build_tokenizer",
    "ensure_bundled_prepared",
    "ensure_prepared",
    "iter_documents",
    "prepare_corpus",
    "shakespeare_texts_dir",
    "train_bpe",
]
