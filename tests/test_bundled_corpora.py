"""The Canterbury corpus from the brotli==1.1.0 sdist (a real download from PyPI, ~7 MB),
its errors on a failed download or an sdist without the texts, and extra validation
corpora prepared with a run's own tokenizer.

    .venv/bin/python -m pytest -q tests/test_bundled_corpora.py
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import types
from pathlib import Path

import pytest

from anyexperts.data import corpus
from anyexperts.data.datasets import build_gpt_datasets
from anyexperts.data.prepare import ensure_bundled_prepared, ensure_prepared
from anyexperts.data.tokenizers import ByteTokenizer, train_bpe

# Sizes after CRLF -> LF; the sdist's files are 152,089, 426,754 and 481,861 bytes.
CANTERBURY_SIZES = {"alice29.txt": 148_481, "lcet10.txt": 419_235, "plrabn12.txt": 471_162}


def data_cfg(**overrides):
    fields = dict(source="canterbury", input_path=None, data_prefix=None, jsonl_field="text", cache_dir=None,
                  tokenizer="byte", tokenizer_path=None, bpe_vocab_size=300, split="2,1,0")
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def fake_pip_download(archive_name: str, members: dict[str, bytes]):
    """A subprocess.run stand-in that saves an sdist with `members` where pip would."""
    def run(command, **kwargs):
        download_dir = Path(command[command.index("-d") + 1])
        with tarfile.open(download_dir / archive_name, "w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(args=command, returncode=0, stdout="", stderr="")
    return run


def test_canterbury_downloads_from_pypi_is_cached_and_prepares(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    texts_dir = corpus.bundled_corpus_dir("canterbury", cache)
    assert texts_dir == cache / "corpora" / "canterbury-brotli-1.1.0" / "texts"
    assert {p.name: p.stat().st_size for p in texts_dir.iterdir()} == CANTERBURY_SIZES
    alice = (texts_dir / "alice29.txt").read_text()
    assert "ALICE'S ADVENTURES IN WONDERLAND" in alice and "\r" not in alice
    assert "Paradise Lost" in (texts_dir / "plrabn12.txt").read_text()[:1000]

    def no_network(*args, **kwargs):
        raise AssertionError("a cached corpus must not be downloaded again")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    assert corpus.bundled_corpus_dir("canterbury", str(cache)) == texts_dir
    tokenizer = ByteTokenizer()
    prefix, _ = ensure_prepared(data_cfg(cache_dir=str(cache)), show_progress=False)
    assert prefix == str(cache / "prepared" / "canterbury-byte" / "text_document")
    documents = indexed(prefix)
    assert len(documents) == 3
    assert tokenizer.detokenize(documents[0][:-1]) == alice and documents[0][-1] == tokenizer.eod
    # data=canterbury's split: Alice and the workshop proceedings train, Paradise Lost validates.
    train, valid, _ = build_gpt_datasets(prefix, tokenizer, seq_length=64, split="2,1,0", seed=1,
                                         num_samples=(8, 8, 0))
    assert train.indices.tolist() == [0, 1] and valid.indices.tolist() == [2]
    # Extra validation with the byte tokenizer reuses the same prepared data.
    assert ensure_bundled_prepared("canterbury", tokenizer, str(cache), show_progress=False) == prefix


def test_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"could not download the Canterbury corpus: .*exited with 1.*No matching"
                                           r".*pip download --no-deps --no-binary brotli brotli==1\.1\.0.*copy the "
                                           r"files alice29\.txt, lcet10\.txt, plrabn12\.txt of "):
        corpus.bundled_corpus_dir("canterbury", tmp_path)
    assert not (tmp_path / "corpora" / "canterbury-brotli-1.1.0" / "texts").exists()


def test_an_sdist_without_all_the_texts_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip_download("Brotli-1.1.0.tar.gz", {
        "Brotli-1.1.0/tests/testdata/alice29.txt": b"Alice\r\n",
        "Brotli-1.1.0/tests/testdata/asyoulik.txt": b"As you like it\r\n",
    }))
    with pytest.raises(RuntimeError, match=r"Brotli-1\.1\.0\.tar\.gz has lcet10\.txt, plrabn12\.txt in "
                                           r"tests/testdata/; the package on PyPI is not what this code expects"):
        corpus.bundled_corpus_dir("canterbury", tmp_path)
    assert not (tmp_path / "corpora" / "canterbury-brotli-1.1.0" / "texts").exists()


def test_a_wheel_instead_of_the_sdist_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip_download("brotli-1.1.0-cp311-linux.whl", {}))
    with pytest.raises(RuntimeError, match=r"saved brotli-1\.1\.0-cp311-linux\.whl, not the sdist Brotli-1\.1\.0\.tar\.gz"):
        corpus.bundled_corpus_dir("canterbury", tmp_path)


def test_a_complete_fake_sdist_extracts_only_the_chosen_texts_with_lf(tmp_path, monkeypatch):
    members = {f"Brotli-1.1.0/tests/testdata/{name}": f"{name}\r\nline two\r\n".encode()
               for name in ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")}
    members["Brotli-1.1.0/tests/testdata/random_org_10k.bin"] = bytes(range(256))
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip_download("Brotli-1.1.0.tar.gz", members))
    texts_dir = corpus.bundled_corpus_dir("canterbury", tmp_path)
    assert sorted(p.name for p in texts_dir.iterdir()) == ["alice29.txt", "lcet10.txt", "plrabn12.txt"]
    assert (texts_dir / "lcet10.txt").read_bytes() == b"lcet10.txt\nline two\n"


def test_extra_validation_is_prepared_with_the_runs_tokenizer(tmp_path):
    texts = ["Alice was beginning to get very tired. " * 5, "Of Mans First Disobedience. " * 5]
    texts_dir = tmp_path / "corpora" / "canterbury-brotli-1.1.0" / "texts"
    texts_dir.mkdir(parents=True)
    for name, text in zip(("alice29.txt", "plrabn12.txt"), texts):
        (texts_dir / name).write_text(text)
    bpe = train_bpe(iter(texts * 10), 300, tmp_path / "run_bpe" / "tokenizer.json")
    prefix = ensure_bundled_prepared("canterbury", bpe, str(tmp_path), show_progress=False)
    assert Path(prefix).parent.name == f"canterbury-hf-{bpe.content_hash[:10]}"
    documents = indexed(prefix)  # its arrays live in the dataset's mmap: keep it
    assert bpe.detokenize(documents[1][:-1].tolist()) == texts[1]
    byte_prefix = ensure_bundled_prepared("canterbury", ByteTokenizer(), str(tmp_path), show_progress=False)
    byte_documents = indexed(byte_prefix)
    assert Path(byte_prefix).parent.name == "canterbury-byte" and len(byte_documents[0]) == len(texts[0]) + 1
    with pytest.raises(ValueError, match="'gutenberg' is not a bundled corpus; choose one of shakespeare, canterbury"):
        ensure_bundled_prepared("gutenberg", bpe, str(tmp_path))
