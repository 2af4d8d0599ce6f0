"""Corpus sources: turn `data.source` into a deterministic stream of document texts.

Accepted sources (checked in this order):

- ``"python-stdlib"``: every ``.py`` file of the running interpreter's standard
  library, in sorted relative-path order (``site-packages`` excluded). Always
  present, so the default config trains with no download.
- ``"python-stdlib-prose"``: the same library's English, its docstrings and comments,
  one document per module (stdlib_prose.py).
- a directory: every regular file below it, sorted by relative path. Files
  ending in ``.jsonl`` or ``.parquet`` are parsed as such; every other file is
  one document if it decodes in ``data.encoding`` (UTF-8 by default). Binary and
  undecodable files are skipped, and the caller is told which (``skipped``).
- a single file: ``.jsonl`` (one JSON object per line with a ``"text"`` field),
  ``.parquet`` (a ``text`` column) or any text file (one document).
- a glob pattern such as ``corpus/**/*.md``: the sorted matches, each read as above.

The order is deterministic so that the train/val split, the tokenizer and the
token files are reproducible from the config alone.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from meshlm.config import ConfigError

STDLIB_SOURCE = "python-stdlib"
STDLIB_PROSE_SOURCE = "python-stdlib-prose"
ACCEPTED = (
    '"python-stdlib", "python-stdlib-prose", a directory of text files, a glob pattern (e.g. "corpus/**/*.txt"), '
    'a .jsonl file with a "text" field per line, or a .parquet file with a "text" column'
)
_GLOB_CHARS = re.compile(r"[*?\[]")


class SkippedFiles:
    """The files a pass over a source left out, by reason (reported once by the caller)."""

    def __init__(self) -> None:
        self.undecodable: list[Path] = []
        self.binary: list[Path] = []
        self.unreadable: list[Path] = []

    def __bool__(self) -> bool:
        return bool(self.undecodable or self.binary or self.unreadable)

    def describe(self, encoding: str, show: int = 5) -> str:
        """One line: how many files were skipped, which, and what would read them."""

        def names(paths: list[Path]) -> str:
            shown = ", ".join(str(p) for p in paths[:show])
            return shown + (f" and {len(paths) - show} more" if len(paths) > show else "")

        parts = []
        if self.undecodable:
            parts.append(
                f"{len(self.undecodable)} file(s) that are not valid {_label(encoding)} ({names(self.undecodable)}); if they are "
                f'text in another encoding, set data.encoding (e.g. "latin-1" or "cp1252") to read them'
            )
        if self.binary:
            parts.append(f"{len(self.binary)} binary file(s) ({names(self.binary)})")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable file(s) ({names(self.unreadable)}: check permissions)")
        return "skipped " + "; ".join(parts) + "."


def iter_documents(
    source: str,
    max_bytes: int = 0,
    max_doc_bytes: int = 0,
    encoding: str = "utf-8",
    skipped: SkippedFiles | None = None,
) -> Iterator[str]:
    """Yield the documents of `source` in a deterministic order.

    `max_doc_bytes` (0 = no limit) skips documents whose UTF-8 size is larger.
    `max_bytes` (0 = no limit) caps the total UTF-8 size: the document that crosses
    the cap is cut at the cap (on a character boundary) and iteration stops, so the
    same cap always gives exactly the same text. Empty documents are skipped.

    Text files are decoded with `encoding`; the files skipped (binary, undecodable,
    unreadable) are added to `skipped` when given.

    The source is checked before this returns (a missing path fails at the call,
    not at the first `next`); a source that yields no document at all raises
    ConfigError when the iteration ends.
    """
    check_encoding(encoding)
    raw = _raw_documents(source, _Reader(encoding, skipped))  # validates the source eagerly
    return _capped(raw, source, max_bytes, max_doc_bytes, encoding)


def _label(encoding: str) -> str:
    """UTF-8 as people write it; other codecs by their name."""
    try:
        return "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    except LookupError:
        return encoding


def check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(
            f"'data.encoding' is {encoding!r}, which Python does not know. Use a codec name such as \"utf-8\", "
            f'"latin-1" or "cp1252".'
        ) from None


def describe_source(source: str) -> str:
    """A stable, filesystem-safe identifier of `source` for cache directory names.

    The stdlib is named by Python version (its content changes between versions);
    paths get a readable name plus a short hash of the absolute path, so two
    folders both called `data` do not share a cache.
    """
    if source in (STDLIB_SOURCE, STDLIB_PROSE_SOURCE):
        return f"{source}-{sys.version_info.major}.{sys.version_info.minor}"
    absolute = os.path.abspath(os.path.expanduser(source))
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:8]
    # Readable part: the source as written, punctuation folded to '_', its last 40 characters.
    name = re.sub(r"[^A-Za-z0-9-]+", "_", source).strip("_")[-40:].strip("_") or "corpus"
    return f"{name}-{digest}"


# ----------------------------------------------------------------------------- dispatch


class _Reader:
    """Reads a text file in the configured encoding, noting the files it has to skip."""

    def __init__(self, encoding: str, skipped: SkippedFiles | None):
        self.encoding, self.skipped = encoding, skipped

    def __call__(self, path: Path) -> str | None:
        """The file as text, or None for unreadable, binary (NUL bytes) or undecodable files."""
        try:
            data = path.read_bytes()
        except OSError:
            return self._skip(path, "unreadable")
        if b"\x00" in data and not self.encoding.lower().replace("-", "").startswith("utf16"):
            return self._skip(path, "binary")
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError:
            return self._skip(path, "undecodable")

    def _skip(self, path: Path, why: str) -> None:
        if self.skipped is not None:
            getattr(self.skipped, why).append(path)
        return None


def _raw_documents(source: str, read: _Reader) -> Iterator[str]:
    if source == STDLIB_SOURCE:
        return _stdlib_documents()
    if source == STDLIB_PROSE_SOURCE:
        from meshlm.data.stdlib_prose import SKIP_DIRS, prose_documents

        return prose_documents(_walk_files(Path(sysconfig.get_paths()["stdlib"]), skip_dirs=SKIP_DIRS))
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return _files_documents(_walk_files(path), read)
    if path.is_file():
        return _file_documents(path, read)
    if _GLOB_CHARS.search(source):
        matches = sorted(p for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not matches:
            raise ConfigError(
                f"data source glob '{source}' matches no files. Check the pattern (use '**' with a "
                f"directory prefix for recursive matches), or set data.source to {ACCEPTED}."
            )
        return _files_documents((Path(p) for p in matches), read)
    raise ConfigError(f"data source '{source}' does not exist. Set data.source to {ACCEPTED}.")


def _capped(docs: Iterator[str], source: str, max_bytes: int, max_doc_bytes: int, encoding: str) -> Iterator[str]:
    total = 0
    count = 0
    for text in docs:
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if max_doc_bytes and size > max_doc_bytes:
            continue
        if max_bytes and total + size >= max_bytes:
            # Cut the last document at the cap so the corpus size is exact.
            head = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            if head:
                count += 1
                yield head
            break
        total += size
        count += 1
        yield text
    if count == 0:
        limit = f" no larger than data.max_doc_bytes={max_doc_bytes}" if max_doc_bytes else ""
        raise ConfigError(
            f"data source '{source}' contains no non-empty {_label(encoding)} documents{limit}. Point data.source "
            f"at a corpus with text in it{' or raise data.max_doc_bytes' if limit else ''} (or set data.encoding if "
            f"its files are text in another encoding); accepted: {ACCEPTED}."
        )


# ----------------------------------------------------------------------------- kinds


def _stdlib_documents() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # site-packages holds whatever is installed, which would make the corpus machine-dependent.
    files = (p for p in _walk_files(root, skip_dirs={"site-packages", "__pycache__"}) if p.suffix == ".py")
    read = _Reader("utf-8", None)
    for path in files:
        text = read(path)
        if text is not None:
            yield text


def _walk_files(root: Path, skip_dirs: set[str] = frozenset()) -> Iterator[Path]:
    """Regular files below `root`, sorted by relative path; hidden entries (.git, ...) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not name.startswith(".") and os.path.isfile(full):
                found.append(os.path.relpath(full, root))
    # Sort on '/'-separated parts so the order is the same on every OS.
    for rel in sorted(found, key=lambda r: r.replace(os.sep, "/")):
        yield root / rel


def _files_documents(paths: Iterator[Path], read: _Reader) -> Iterator[str]:
    for path in paths:
        yield from _file_documents(path, read)


def _file_documents(path: Path, read: _Reader) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path)
    if suffix == ".parquet":
        return _parquet_documents(path)
    text = read(path)
    return iter(() if text is None else (text,))


def _jsonl_documents(path: Path) -> Iterator[str]:
    fix = 'Each line must be a JSON object with a string "text" field; fix or remove that line.'
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} line {line_no} is not valid JSON ({e}). {fix}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                what = 'has no "text" field' if isinstance(obj, dict) else f"is a {type(obj).__name__}"
                if isinstance(obj, dict) and "text" in obj:
                    what = f'has a "text" field of type {type(obj["text"]).__name__}'
                raise ConfigError(f"{path} line {line_no} {what}. {fix}")
            yield obj["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # imported here: only parquet sources pay for it

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError(
            f"{path} is not a readable parquet file ({e}). Check the file or convert it to .jsonl."
        ) from None
    columns = file.schema_arrow.names
    if "text" not in columns:
        raise ConfigError(
            f"{path} has no 'text' column (columns: {', '.join(columns) or 'none'}). "
            f"Rename the column holding the documents to 'text'."
        )
    for batch in file.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
