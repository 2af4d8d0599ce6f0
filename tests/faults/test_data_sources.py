"""Data-source faults (items 9, 10, 12): errors leave no empty cache directory, a vocabulary too
small for the tokenizer is refused before the corpus is read, undecodable files are reported
(and data.encoding reads them), and a long single-line document is prepared in pieces with
exactly the tokens of encoding it whole."""

from __future__ import annotations

import os

import numpy as np
import pytest

from faults.conftest import assert_clean_error, meshlm
from meshlm.config import ConfigError, DataConfig
from meshlm.data.prepare import prepare_data
from meshlm.data.tokenizer import PIECE_CHARS, encode, load_tokenizer, split_long_text, train_tokenizer


def test_source_errors_leave_no_cache_directory(tmp_path):
    cache = tmp_path / "cache"
    missing = DataConfig(source=str(tmp_path / "nowhere"), cache_dir=str(cache))
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_data(missing, 512, log=lambda _: None)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("a single document")
    single = DataConfig(source=str(tmp_path / "one"), cache_dir=str(cache))
    with pytest.raises(ConfigError, match="has 1 document"):  # found while reading: after the folder was made
        prepare_data(single, 512, log=lambda _: None)
    assert not cache.exists(), "the folders a failed prepare created are removed"


def test_a_tiny_vocabulary_is_refused_before_the_corpus_is_read(tmp_path):
    """The corpus is a FIFO with no writer: reading it would block, so the command can only
    return if it checks the vocabulary first."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    os.mkfifo(corpus / "blocks.txt")
    proc = meshlm(
        "data", "prepare", "--source", corpus, "--out", tmp_path / "data", "--set", "model.vocab_size=1", timeout=120
    )
    assert_clean_error(proc, 2, "'model.vocab_size' (1) is too small", "at least 257")
    assert not (tmp_path / "data").exists()


def test_undecodable_files_are_reported_and_data_encoding_reads_them(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"plain document number {i} " * 20, encoding="utf-8")
    for name in ("caf\u00e9.txt", "r\u00e9sum\u00e9.txt"):
        (corpus / name).write_bytes(("na\u00efve caf\u00e9 cr\u00e8me " * 30).encode("latin-1"))
    (corpus / "blob.bin").write_bytes(b"\x00\x01binary")
    logs: list[str] = []
    cfg = DataConfig(source=str(corpus), seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    prepare_data(cfg, 300, log=logs.append)
    (skipped,) = [line for line in logs if "skipped" in line]
    assert "2 file(s) that are not valid UTF-8" in skipped and "caf\u00e9.txt" in skipped
    assert 'data.encoding (e.g. "latin-1"' in skipped and "1 binary file(s)" in skipped
    assert any("12 documents" in line for line in logs)

    logs.clear()
    cfg.encoding = "latin-1"
    prepare_data(cfg, 300, log=logs.append)
    assert any("14 documents" in line for line in logs), logs  # a new setting: prepared again, with them


def test_a_long_single_line_document_is_encoded_in_pieces_with_the_same_tokens(tmp_path):
    words = ["alpha", "beta,", "gamma.", "  delta", "(eps)", "42", "\u00e9t\u00e9", "x\ny", "\t tab"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(60_000))  # ~400 KB, one line mostly
    tok = train_tokenizer([text[:50_000]], 400)
    pieces = split_long_text(text, 4096)
    assert len(pieces) > 50 and "".join(pieces) == text and max(map(len, pieces)) <= 4096
    assert encode(tok, text) == tok.encode(text, add_special_tokens=False).ids

    # prepare cuts it (> PIECE_CHARS characters) the same way: its token file holds the whole's tokens
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "long.txt").write_text(text)
    (corpus / "short.txt").write_text("a short second document. " * 40)
    cfg = DataConfig(source=str(corpus), seq_len=8, val_fraction=0.5, dir=str(tmp_path / "prepared"))
    out = prepare_data(cfg, 400, log=lambda _: None)  # one document per split: no separators
    assert len(text) > PIECE_CHARS
    prepared = load_tokenizer(out / "tokenizer.json")
    stored = max((np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")), key=len)
    assert stored.tolist() == prepared.encode(text, add_special_tokens=False).ids
