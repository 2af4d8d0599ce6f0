"""The on-disk format of a prepared data directory, shared by `prepare` and `loader`.

    tokenizer.json   byte-level BPE (see tokenizer.py)
    train.bin        flat token ids, documents joined by the <|endoftext|> id
    val.bin          same, for the held-out documents
    index.json       what produced the files, token counts, dtype, sha256 of each file

index.json is written last: a directory without it is not prepared, whatever
else it contains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from meshlm.config import ConfigError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


def bin_file(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}.bin"


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id (0 .. vocab_size-1) fits, else uint32: half the disk and page cache."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def read_index(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise ConfigError(
            f"no prepared data in {data_dir} ({INDEX_FILE} is missing). Run `meshlm data prepare` with the same "
            f"config (or let `meshlm train` prepare it) before loading."
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}). Delete {data_dir} and run `meshlm data prepare` again."
        ) from None
    if index.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{data_dir} was prepared with data format version {index.get('format_version')}, this meshlm reads "
            f"version {FORMAT_VERSION}. Delete {data_dir} and run `meshlm data prepare` again."
        )
    return index


def write_index(data_dir: Path, index: dict[str, Any]) -> None:
    (Path(data_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def bin_problem(data_dir: Path, index: dict[str, Any], split: str) -> str | None:
    """Why `split`'s token file does not match the index (missing, wrong size), or None if it does.

    Only the size is checked: it is free, and it catches truncated copies and
    interrupted writes. `meshlm.utils.file_hash.file_sha256` is there for a full check.
    """
    path = Path(data_dir) / bin_file(split)
    if not path.is_file():
        return f"{path} is missing"
    expected = int(index[f"n_{split}_tokens"]) * np.dtype(index["dtype"]).itemsize
    actual = path.stat().st_size
    if actual != expected:
        return (
            f"{path} is {actual} bytes but {INDEX_FILE} records {index[f'n_{split}_tokens']} {index['dtype']} "
            f"tokens ({expected} bytes), so the file is truncated or from another prepare"
        )
    return None
