"""Corpus -> tokenizer.json + train.bin + val.bin + index.json (format: see index.py).

Three streaming passes over the source, so memory stays flat for large corpora:
  1. hash every document to assign it to train or val (and report skipped files),
  2. train the tokenizer on the training documents (skipped when one exists),
  3. encode both splits in parallel batches and write the token files.
Long documents are cut into pieces at word boundaries for steps 2 and 3 (same tokens, see
tokenizer.split_long_text) and batches are bounded in characters as well as documents, so a
50 MB single-line document costs a few hundred MB, not the ~12 GB of encoding it whole.

Before any of it, `check_data_source` looks at what can be checked without reading the corpus
(the source exists, the vocabulary can hold a byte-level tokenizer, the data directory can be
written): the launcher runs it before starting workers. A failed prepare removes the
directories it created, so no empty cache folder is left behind.

Everything is written into a hidden temp folder inside the data directory and
moved into place file by file with `os.replace`, index.json last (after the old
one is removed). An interrupted prepare therefore never leaves a directory that
looks complete, and a data directory the user chose is never deleted wholesale.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from meshlm.config import ConfigError, DataConfig
from meshlm.data.index import (
    FORMAT_VERSION,
    INDEX_FILE,
    SPLITS,
    TOKENIZER_FILE,
    bin_file,
    bin_problem,
    read_index,
    token_dtype,
    write_index,
)
from meshlm.data.sources import SkippedFiles, check_encoding, describe_source, iter_documents
from meshlm.data.tokenizer import (
    MIN_VOCAB_SIZE,
    document_separator_id,
    load_or_train_tokenizer,
    split_long_text,
)
from meshlm.utils.file_hash import file_sha256
from meshlm.utils.paths import output_dir_problem

# Pieces per encode_batch call: large enough for the Rust thread pool to stay busy, small
# enough that the batch's Encodings (~200 bytes per token) stay a few hundred MB at most.
ENCODE_CHUNK_DOCS = 256
ENCODE_CHUNK_CHARS = 1 << 20
SPLIT_BUCKETS = 10_000


def default_data_dir(cfg_data: DataConfig, vocab_size: int) -> Path:
    """Where prepared data lives when `data.dir` is empty: named after what produced it."""
    name = f"{describe_source(cfg_data.source)}-v{vocab_size}-b{cfg_data.max_bytes}"
    if cfg_data.tokenizer and Path(cfg_data.tokenizer).is_file():
        name += f"-tok{file_sha256(Path(cfg_data.tokenizer))[:8]}"  # an imported tokenizer gets its own folder
    return Path(cfg_data.cache_dir) / name


def data_dir_for(cfg_data: DataConfig, vocab_size: int) -> Path:
    return Path(cfg_data.dir) if cfg_data.dir else default_data_dir(cfg_data, vocab_size)


def check_data_source(cfg_data: DataConfig, vocab_size: int, out_dir: Path | None = None) -> None:
    """What can be wrong with the data settings without reading the corpus, as one ConfigError:
    run before any work (and by the launcher before any worker starts). Nothing is checked
    when the data is already prepared for these settings (the source may be gone by then)."""
    out = Path(out_dir) if out_dir is not None else data_dir_for(cfg_data, vocab_size)
    if _is_prepared(out, cfg_data, vocab_size):
        return
    check_encoding(cfg_data.encoding)
    if cfg_data.tokenizer and not Path(cfg_data.tokenizer).is_file():
        raise ConfigError(
            f"'data.tokenizer' is {cfg_data.tokenizer}, which does not exist. Point it to a tokenizer.json, or leave "
            f"it empty to train one on the corpus."
        )
    if not cfg_data.tokenizer and vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"'model.vocab_size' ({vocab_size}) is too small for a byte-level tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + the end-of-text token). Raise model.vocab_size."
        )
    iter_documents(cfg_data.source, encoding=cfg_data.encoding)  # checks that the source exists; reads nothing
    problem = output_dir_problem(out)
    if problem:
        key = "data.dir" if cfg_data.dir else "data.cache_dir"
        raise ConfigError(f"cannot write the prepared data: {problem}. Set {key} to a writable directory.")


def _is_prepared(out: Path, cfg_data: DataConfig, vocab_size: int) -> bool:
    return (out / INDEX_FILE).is_file() and _stale_reason(out, _settings(cfg_data, vocab_size)) is None


def prepare_data(
    cfg_data: DataConfig, vocab_size: int, out_dir: Path | None = None, log: Callable[[str], None] = print
) -> Path:
    """Prepare (or reuse) the token files for `cfg_data`; return the data directory."""
    out = Path(out_dir) if out_dir is not None else data_dir_for(cfg_data, vocab_size)
    check_data_source(cfg_data, vocab_size, out)
    wanted = _settings(cfg_data, vocab_size)
    reuse_tokenizer = (out / TOKENIZER_FILE).is_file()

    if (out / INDEX_FILE).is_file():
        reason = _stale_reason(out, wanted)
        if reason is None:
            index = read_index(out)
            _check_enough_tokens(index, cfg_data, out)
            log(f"data: reusing {out} ({index['n_train_tokens']:,} train / {index['n_val_tokens']:,} val tokens)")
            return out
        log(f"data: preparing {out} again: {reason}")
        # The tokenizer there belongs to the old settings; train a fresh one.
        reuse_tokenizer = False

    created = _make_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        index = _prepare_into(tmp, out, cfg_data, vocab_size, wanted, reuse_tokenizer, log)
        _check_enough_tokens(index, cfg_data, out)
        _publish(tmp, out, moved_tokenizer=not reuse_tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p `out`; returns the directories this created, deepest first."""
    created = []
    path = out.absolute()
    while not path.exists():
        created.append(path)
        path = path.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove_if_empty(directories: list[Path]) -> None:
    for path in directories:  # deepest first
        try:
            path.rmdir()
        except OSError:  # not empty (or already gone): leave it
            return


# ----------------------------------------------------------------------------- steps


def _settings(cfg_data: DataConfig, vocab_size: int) -> dict:
    """Everything that determines the prepared files; a change in any of them means re-preparing."""
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg_data.source,
        "source_id": describe_source(cfg_data.source),
        "vocab_size": vocab_size,
        "max_bytes": cfg_data.max_bytes,
        "max_doc_bytes": cfg_data.max_doc_bytes,
        "val_fraction": cfg_data.val_fraction,
        "encoding": cfg_data.encoding,
        # an imported tokenizer (e.g. a Hugging Face model's), identified by its content
        "tokenizer_source": file_sha256(Path(cfg_data.tokenizer)) if cfg_data.tokenizer else "trained",
    }


def _stale_reason(out: Path, wanted: dict) -> str | None:
    try:
        index = read_index(out)
    except ConfigError as e:
        return str(e)
    changed = [f"{k} {index.get(k)!r} -> {v!r}" for k, v in wanted.items() if index.get(k) != v]
    if changed:
        return "settings changed (" + ", ".join(changed) + ")"
    for split in SPLITS:
        problem = bin_problem(out, index, split)
        if problem:
            return problem
    return None


def _prepare_into(
    tmp: Path, out: Path, cfg_data: DataConfig, vocab_size: int, wanted: dict, reuse_tokenizer: bool, log
) -> dict:
    def documents(skipped: SkippedFiles | None = None) -> Iterator[str]:
        return iter_documents(
            cfg_data.source, cfg_data.max_bytes, cfg_data.max_doc_bytes, cfg_data.encoding, skipped=skipped
        )

    skipped = SkippedFiles()
    try:
        is_val = _assign_splits(documents(skipped), cfg_data.val_fraction, cfg_data.source)
    finally:
        if skipped:
            log(f"data: {skipped.describe(cfg_data.encoding)}")
    log(f"data: {len(is_val):,} documents from {cfg_data.source} ({sum(is_val):,} held out for validation)")

    start = time.perf_counter()
    tok_path = out / TOKENIZER_FILE if reuse_tokenizer else tmp / TOKENIZER_FILE
    if cfg_data.tokenizer and not reuse_tokenizer:
        shutil.copyfile(cfg_data.tokenizer, tok_path)  # use the given tokenizer instead of training one
    # The trainer counts words; pieces cut at word boundaries give it the same counts.
    train_docs = lambda: (  # noqa: E731
        piece for text, val in zip(documents(), is_val) if not val for piece in split_long_text(text)
    )
    tok = load_or_train_tokenizer(tok_path, train_docs, vocab_size)
    verb = "reused" if reuse_tokenizer else ("copied" if cfg_data.tokenizer else "trained")
    separator = document_separator_id(tok, str(tok_path))
    log(f"data: {verb} tokenizer ({tok.get_vocab_size()} tokens) in {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    dtype = token_dtype(vocab_size)
    writers = {split: _TokenWriter(tmp / bin_file(split), dtype, separator) for split in SPLITS}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.20)
    for chunk in _piece_batches(zip(documents(), is_val)):
        for split, want_val in (("train", False), ("val", True)):
            part = [(piece, first) for piece, val, first in chunk if val == want_val]
            if part:
                encoded = encode([piece for piece, _ in part], add_special_tokens=False)
                for (_, first), e in zip(part, encoded):
                    writers[split].add(e.ids, starts_document=first)
    for w in writers.values():
        w.close()
    tokens = writers["train"].n_tokens + writers["val"].n_tokens
    log(f"data: encoded {tokens:,} tokens in {time.perf_counter() - start:.1f}s")

    index = dict(wanted)
    index.update(
        tokenizer_vocab_size=tok.get_vocab_size(),
        eot_id=separator,
        dtype=dtype,
        split_rule=f"blake2b(utf-8 text) % {SPLIT_BUCKETS} < val_fraction * {SPLIT_BUCKETS}",
        sha256={bin_file(s): writers[s].sha256 for s in SPLITS} | {TOKENIZER_FILE: file_sha256(tok_path)},
    )
    for split in SPLITS:
        index[f"n_{split}_tokens"] = writers[split].n_tokens
        index[f"n_{split}_docs"] = writers[split].n_docs
    write_index(tmp, index)
    return index


def _assign_splits(docs: Iterable[str], val_fraction: float, source: str) -> list[bool]:
    """Per document: held out for validation? Decided by a hash of the content, so a
    document keeps its split when others are added or removed, and duplicates never
    straddle train and val. At least one document goes to each side."""
    buckets = array("H")
    for text in docs:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        buckets.append(int.from_bytes(digest, "little") % SPLIT_BUCKETS)
    if len(buckets) < 2:
        raise ConfigError(
            f"data source '{source}' has {len(buckets)} document; a train/validation split needs at least 2. "
            f"Add documents (or raise data.max_bytes / data.max_doc_bytes)."
        )
    threshold = val_fraction * SPLIT_BUCKETS
    is_val = [b < threshold for b in buckets]
    if not any(is_val):
        is_val[min(range(len(buckets)), key=buckets.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(buckets)), key=buckets.__getitem__)] = False
    return is_val


def _check_enough_tokens(index: dict, cfg_data: DataConfig, out: Path) -> None:
    need = cfg_data.seq_len + 1
    short = [s for s in SPLITS if index[f"n_{s}_tokens"] < need]
    if short:
        counts = ", ".join(f"{index[f'n_{s}_tokens']:,} {s}" for s in SPLITS)
        raise ConfigError(
            f"the data in {out} has too few tokens ({counts}): the {' and '.join(short)} "
            f"{'splits need' if len(short) > 1 else 'split needs'} at least "
            f"data.seq_len + 1 = {need} for one window. Use more data (another data.source, or a larger "
            f"data.max_bytes)"
            + (
                ", a smaller data.seq_len, or a larger data.val_fraction."
                if short == ["val"]
                else " or a smaller data.seq_len."
            )
        )


def _publish(tmp: Path, out: Path, moved_tokenizer: bool) -> None:
    """Move the finished files into `out`; the old index goes first, the new one last."""
    (out / INDEX_FILE).unlink(missing_ok=True)
    names = [bin_file(s) for s in SPLITS] + ([TOKENIZER_FILE] if moved_tokenizer else [])
    for name in names:
        (tmp / name).replace(out / name)
    (tmp / INDEX_FILE).replace(out / INDEX_FILE)


def _piece_batches(docs: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool, bool]]]:
    """(piece, is_val, starts_a_document) in batches of at most ENCODE_CHUNK_DOCS pieces and
    about ENCODE_CHUNK_CHARS characters (a piece is never cut further)."""
    batch: list[tuple[str, bool, bool]] = []
    chars = 0
    for text, val in docs:
        for i, piece in enumerate(split_long_text(text)):
            batch.append((piece, val, i == 0))
            chars += len(piece)
            if len(batch) == ENCODE_CHUNK_DOCS or chars >= ENCODE_CHUNK_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


class _TokenWriter:
    """Appends documents (whole, or piece by piece) to a flat token file, the separator id
    between consecutive documents."""

    def __init__(self, path: Path, dtype: str, separator: int):
        self.separator = separator
        self.file = open(path, "wb")
        self.dtype = np.dtype(dtype)
        self.digest = hashlib.sha256()
        self.n_tokens = 0
        self.n_docs = 0

    def add(self, ids: list[int], starts_document: bool = True) -> None:
        if starts_document:
            if self.n_docs:
                ids = [self.separator, *ids]
            self.n_docs += 1
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.n_tokens += len(ids)

    def close(self) -> None:
        self.file.close()
        self.sha256 = self.digest.hexdigest()
