"""Data pipeline: sources, tokenizer, prepare (split, reuse, atomicity) and the sampler contract."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from meshlm.config import ConfigError, DataConfig
from meshlm.data import (
    EOT_ID,
    EOT_TOKEN,
    TokenDataset,
    decode,
    default_data_dir,
    describe_source,
    encode,
    eval_batch,
    eval_batches,
    get_batch,
    iter_documents,
    load_or_train_tokenizer,
    load_tokenizer,
    prepare_data,
    sample_ids_for,
    train_batch,
    train_tokenizer,
)
from meshlm.data import prepare as prepare_module
from meshlm.data.loader import train_offsets

VOCAB = 300
SAMPLES = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "日本語のテキスト, émigré, Ünïcödé, русский текст",
    "emoji 🙂🚀 and combining e\u0301 and zero\u200bwidth",
    f"a literal {EOT_TOKEN} inside text",
    "\x00\x01 control bytes \x7f",
    "",
]


def corpus_docs(n: int = 60) -> list[str]:
    """Unique, deterministic documents with code, prose and non-ASCII text."""
    return [
        f"# document {i} — ünïcode 🙂\ndef func_{i}(x, y={i}):\n    return x * {i} + y ** 2  # {'ab' * (i % 7)}\n"
        * (1 + i % 3)
        for i in range(n)
    ]


def write_dir_corpus(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_docs() + SAMPLES, VOCAB)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    source = write_dir_corpus(root / "corpus", corpus_docs())
    cfg = DataConfig(source=str(source), seq_len=16, val_fraction=0.2, cache_dir=str(root / "cache"))
    return prepare_data(cfg, VOCAB, log=lambda _: None)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_eot(tokenizer):
    assert tokenizer.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert tokenizer.get_vocab_size() <= VOCAB
    for text in SAMPLES + corpus_docs(5):
        ids = encode(tokenizer, text)
        assert decode(tokenizer, ids) == text
        # The end-of-text id only ever comes from prepare, never from document text.
        assert EOT_ID not in ids
    assert len(encode(tokenizer, corpus_docs(1)[0])) < len(corpus_docs(1)[0].encode())  # merges happened


def test_tokenizer_reload_from_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = train_tokenizer(corpus_docs(20), VOCAB, path)
    reloaded = load_tokenizer(path)
    for text in SAMPLES:
        assert encode(reloaded, text) == encode(tok, text)
        assert decode(reloaded, encode(reloaded, text)) == text

    def must_not_train():
        raise AssertionError("an existing tokenizer must be reused")

    assert load_or_train_tokenizer(path, must_not_train, VOCAB).get_vocab_size() == tok.get_vocab_size()
    with pytest.raises(ConfigError, match="vocab_size"):
        load_or_train_tokenizer(path, must_not_train, 260)


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ConfigError, match="at least 257"):
        train_tokenizer(["abc"], 100)


# ----------------------------------------------------------------------------- sources


def test_directory_source_sorted_skips_binary_hidden_and_non_utf8(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("nested")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.py").write_text("print('third')")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "empty.txt").write_text("")
    assert list(iter_documents(str(tmp_path))) == ["first", "nested", "print('third')"]


def test_glob_source(tmp_path):
    for name, text in [("x2.md", "two"), ("x1.md", "one"), ("y.txt", "other")]:
        (tmp_path / name).write_text(text)
    assert list(iter_documents(str(tmp_path / "x*.md"))) == ["one", "two"]
    with pytest.raises(ConfigError, match="matches no files"):
        iter_documents(str(tmp_path / "nothing*.md"))


def test_jsonl_source_and_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert list(iter_documents(str(good))) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match="line 3"):
        list(iter_documents(str(bad)))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "a"}\n')
    with pytest.raises(ConfigError, match='line 1 has no "text" field'):
        list(iter_documents(str(no_field)))


def test_parquet_source(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "id": [1, 2, 3]}), path)
    assert list(iter_documents(str(path))) == ["alpha", "beta"]
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), wrong)
    with pytest.raises(ConfigError, match="columns: content, id"):
        list(iter_documents(str(wrong)))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*python-stdlib"):
        iter_documents(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no non-empty UTF-8 documents"):
        list(iter_documents(str(tmp_path / "empty")))


def test_byte_caps(tmp_path):
    write_dir_corpus(tmp_path, ["aaaa", "bbbbbbbbbb", "cccc", "é" * 4])
    assert list(iter_documents(str(tmp_path), max_doc_bytes=5)) == ["aaaa", "cccc"]
    assert list(iter_documents(str(tmp_path), max_bytes=6)) == ["aaaa", "bb"]
    # A cut never splits a UTF-8 character.
    assert list(iter_documents(str(tmp_path), max_bytes=4 + 10 + 4 + 3)) == ["aaaa", "b" * 10, "cccc", "é"]


def test_python_stdlib_source_is_deterministic():
    first = list(iter_documents("python-stdlib", max_bytes=300_000))
    assert len(first) >= 5
    assert first == list(iter_documents("python-stdlib", max_bytes=300_000))
    assert sum(len(t.encode()) for t in first) == 300_000
    assert describe_source("python-stdlib").startswith("python-stdlib-3.")


def test_describe_source_is_stable_and_distinct(tmp_path):
    a, b = tmp_path / "x" / "data", tmp_path / "y" / "data"
    assert describe_source(str(a)) == describe_source(str(a))
    assert describe_source(str(a)) != describe_source(str(b))
    name = describe_source(str(tmp_path / "my corpus" / "*.md"))
    assert "/" not in name and " " not in name and "*" not in name
    cfg = DataConfig(source=str(a), cache_dir="cache", max_bytes=7)
    assert default_data_dir(cfg, 512).name == f"{describe_source(str(a))}-v512-b7"


# ----------------------------------------------------------------------------- prepare


def split_documents(data_dir, split, tok) -> list[str]:
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=json.loads((data_dir / "index.json").read_text())["dtype"])
    parts = np.split(tokens, np.flatnonzero(tokens == EOT_ID))
    # Every part but the first starts with the EOT id that separates it from the previous document.
    return [decode(tok, parts[0].tolist())] + [decode(tok, p[1:].tolist()) for p in parts[1:]]


def test_prepare_writes_disjoint_deterministic_split(prepared, tmp_path):
    index = json.loads((prepared / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == VOCAB and index["eot_id"] == EOT_ID
    tok = load_tokenizer(prepared / "tokenizer.json")
    train = split_documents(prepared, "train", tok)
    val = split_documents(prepared, "val", tok)
    assert (len(train), len(val)) == (index["n_train_docs"], index["n_val_docs"])
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(corpus_docs())
    assert 0 < len(val) < len(train)
    for split in ("train", "val"):
        assert index[f"n_{split}_tokens"] * 2 == (prepared / f"{split}.bin").stat().st_size
    # The same corpus elsewhere gives byte-identical files.
    again = prepare_data(
        DataConfig(source=index["source"], seq_len=16, val_fraction=0.2, dir=str(tmp_path / "other")),
        VOCAB,
        log=lambda _: None,
    )
    assert json.loads((again / "index.json").read_text())["sha256"] == index["sha256"]


def test_prepare_reuses_and_redoes_when_settings_change(tmp_path):
    source = write_dir_corpus(tmp_path / "corpus", corpus_docs(30))
    cfg = DataConfig(source=str(source), seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    logs: list[str] = []
    out = prepare_data(cfg, VOCAB, log=logs.append)
    assert out == default_data_dir(cfg, VOCAB)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs.clear()
    assert prepare_data(cfg, VOCAB, log=logs.append) == out
    assert any("reusing" in line for line in logs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    cfg.val_fraction = 0.3
    logs.clear()
    prepare_data(cfg, VOCAB, log=logs.append)
    assert any("val_fraction" in line for line in logs)
    assert json.loads((out / "index.json").read_text())["val_fraction"] == 0.3
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "tokenizer.json", "train.bin", "val.bin"]


def test_interrupted_prepare_leaves_no_index(tmp_path, monkeypatch):
    source = write_dir_corpus(tmp_path / "corpus", corpus_docs(20))
    cfg = DataConfig(source=str(source), seq_len=8, dir=str(tmp_path / "out"))

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._TokenWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, VOCAB, log=lambda _: None)
    assert not (tmp_path / "out").exists(), "the directory this prepare created is removed again"
    with pytest.raises(ConfigError, match="meshlm data prepare"):
        TokenDataset(tmp_path / "out", "train")


def test_prepare_too_few_tokens(tmp_path):
    source = write_dir_corpus(tmp_path / "corpus", ["tiny one", "tiny two", "tiny three"])
    cfg = DataConfig(source=str(source), seq_len=64, val_fraction=0.3, dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="seq_len"):
        prepare_data(cfg, VOCAB, log=lambda _: None)
    assert not (tmp_path / "out" / "index.json").exists()


# ----------------------------------------------------------------------------- loader


def test_batches_are_deterministic_shifted_windows(prepared):
    ds = TokenDataset(prepared, "train")
    x, y = train_batch(ds, 16, seed=1, step=3, sample_ids=range(4))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    x2, y2 = train_batch(ds, 16, seed=1, step=3, sample_ids=range(4))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(np.asarray(ds.tokens, dtype=np.int64))
    for o, row_x, row_y in zip(train_offsets(len(ds), 16, 1, 3, range(4)), x, y):
        assert 0 <= o <= len(ds) - 17
        assert torch.equal(row_x, tokens[o : o + 16]) and torch.equal(row_y, tokens[o + 1 : o + 17])
    assert not torch.equal(train_batch(ds, 16, seed=1, step=4, sample_ids=range(4))[0], x)
    assert not torch.equal(train_batch(ds, 16, seed=2, step=3, sample_ids=range(4))[0], x)


def test_sample_ids_cover_the_global_batch_for_any_layout():
    global_batch = 24
    for dp, micro in [(1, 24), (1, 6), (2, 12), (2, 3), (3, 4), (4, 2), (8, 1)]:
        accumulation = global_batch // (dp * micro)
        ids = [i for m in range(accumulation) for r in range(dp) for i in sample_ids_for(m, micro, r, dp)]
        assert sorted(ids) == list(range(global_batch)), (dp, micro)


def test_layouts_see_the_same_global_batch(prepared):
    ds = TokenDataset(prepared, "train")
    single_x, single_y = get_batch(ds, 16, batch_size=8, seed=7, step=5)
    parts = {}
    for m in range(2):
        for r in range(2):
            ids = sample_ids_for(m, 2, r, 2)
            x, y = get_batch(ds, 16, batch_size=2, seed=7, step=5, rank=r, micro_step=m, dp_size=2)
            for i, sample in enumerate(ids):
                parts[sample] = (x[i], y[i])
    assert torch.equal(torch.stack([parts[i][0] for i in range(8)]), single_x)
    assert torch.equal(torch.stack([parts[i][1] for i in range(8)]), single_y)


def test_resume_at_step_draws_the_same_batch(prepared):
    ds = TokenDataset(prepared, "train")
    fresh = train_batch(ds, 16, seed=3, step=10, sample_ids=range(4))
    ds2 = TokenDataset(prepared, "train")
    for step in range(10):
        train_batch(ds2, 16, seed=3, step=step, sample_ids=range(4))
    resumed = train_batch(ds2, 16, seed=3, step=10, sample_ids=range(4))
    assert all(torch.equal(a, b) for a, b in zip(fresh, resumed))


def test_eval_set_is_fixed_and_shareable(prepared):
    ds = TokenDataset(prepared, "val")
    batches = eval_batches(ds, 16, batch_size=2, n_batches=3)
    assert len(batches) == 3 and all(x.shape == (2, 16) for x, _ in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(ds, 16, 2, 3)))
    # Evenly spaced: the first window starts the split, the last one ends it.
    assert torch.equal(batches[0][0][0], torch.from_numpy(ds.tokens[:16].astype(np.int64)))
    assert torch.equal(batches[-1][1][-1], torch.from_numpy(ds.tokens[-16:].astype(np.int64)))
    # Two ranks taking their share of eval batch 1 reassemble it.
    shares = [eval_batch(ds, 16, sample_ids_for(1, 1, r, 2), n_samples=6)[0] for r in range(2)]
    assert torch.equal(torch.cat(shares), batches[1][0])


def test_truncated_or_missing_bin_is_reported(prepared, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("index.json", "tokenizer.json", "train.bin"):
        (broken / name).write_bytes((prepared / name).read_bytes())
    (broken / "val.bin").write_bytes((prepared / "val.bin").read_bytes()[:-2])
    assert len(TokenDataset(broken, "train")) > 0
    with pytest.raises(ConfigError, match="truncated.*meshlm data prepare"):
        TokenDataset(broken, "val")
    os.remove(broken / "val.bin")
    with pytest.raises(ConfigError, match="val.bin is missing"):
        TokenDataset(broken, "val")
    with pytest.raises(ConfigError, match="index.json is missing"):
        TokenDataset(tmp_path / "nowhere", "train")


def test_window_longer_than_split_is_a_config_error(prepared):
    ds = TokenDataset(prepared, "val")
    with pytest.raises(ConfigError, match="seq_len"):
        train_batch(ds, len(ds), seed=0, step=0, sample_ids=[0])


def test_stdlib_prose_keeps_docstrings_and_comments():
    from meshlm.data.stdlib_prose import module_prose

    source = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docs."""
x = 1  # a comment
class A:
    """Class docs."""
    def f(self):
        """Function docs."""
        return "not prose"  # another
'''
    assert module_prose(source) == "Module docs.\n\nClass docs.\n\nFunction docs.\n\na comment another"
    assert module_prose("def broken(:") == ""


def test_stdlib_prose_source_yields_english_documents():
    from meshlm.data.sources import describe_source, iter_documents

    docs = list(iter_documents("python-stdlib-prose", max_bytes=20_000))
    assert len(docs) > 1
    assert sum(len(d.encode()) for d in docs) == 20_000
    assert describe_source("python-stdlib-prose").startswith("python-stdlib-prose-3.")
