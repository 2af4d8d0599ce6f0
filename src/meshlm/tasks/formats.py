"""Reading the data formats users already have, with errors that name the file and line.

    classify   JSONL {"text": ..., "label": ...} per line, or CSV with a header naming the
               "text" and "label" columns
    ner        CoNLL-2003 columns (token first, tag last, a blank line between sentences,
               -DOCSTART- lines skipped) or JSONL {"tokens": [...], "tags": [...]}
    srl        JSONL {"tokens": [...], "predicate": i, "tags": [...]} (i: the predicate's token
               index, tags its argument roles), or CoNLL-2005 columns (word first, then a
               target column holding the predicate's lemma or "-", then one bracketed
               proposition column per predicate: "(A0*", "*", "*)", "(V*)")

Tags are IOB1, IOB2 or BIOES, detected per file (schemes.py) and returned normalised to IOB2,
with the detected scheme. Prediction inputs are the same files without labels, or JSONL with
{"text"} (classify, ner), {"tokens"} (ner) or {"tokens", "predicate"} (srl).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.tasks.schemes import TagError, check_scheme, detect_scheme, split_tag, to_iob2


@dataclass
class Example:
    line: int  # 1-based line of the file where the example starts
    text: str | None = None
    label: str | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None
    predicate: int | None = None


class DataError(ConfigError):
    """Bad task data: the message starts with "FILE line N:"."""


def _error(path: Path, line: int, message: str) -> DataError:
    return DataError(f"{path} line {line}: {message}")


def read_examples(path: Path | str, task: str, labelled: bool = True) -> tuple[list[Example], str]:
    """The examples of a task file and its tag scheme ("IOB2" for classify). Tags come back in
    IOB2. `labelled=False` reads prediction inputs (labels may be absent)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} not found.")
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8", errors="replace").strip():
        raise DataError(f"{path} line 1: the file is empty; it needs at least one example.")
    if task == "classify":
        examples = _read_csv(path, labelled) if path.suffix.lower() == ".csv" else _read_jsonl(path, task, labelled)
        return examples, "IOB2"
    if path.suffix.lower() in (".jsonl", ".json"):
        examples = _read_jsonl(path, task, labelled)
    elif task == "srl":
        examples = _read_conll05(path)
    else:
        examples = _read_conll(path, labelled)
    if not labelled and all(e.tags is None for e in examples):
        return examples, "IOB2"
    return _normalise(path, examples)


def _normalise(path: Path, examples: list[Example]) -> tuple[list[Example], str]:
    for e in examples:
        for tag in e.tags or []:
            try:
                split_tag(tag)
            except TagError as err:
                raise _error(
                    path,
                    e.line,
                    f"unknown tag scheme: {err}. Tags are O, B-TYPE, I-TYPE, E-TYPE or S-TYPE (IOB1, IOB2, BIOES).",
                ) from None
    scheme = detect_scheme([e.tags for e in examples if e.tags])
    if scheme == "IOB1" and _starts_with_b(examples):
        scheme = "IOB2"  # B- opens entities after O: IOB2 data, and its I- after O is an error below
    for e in examples:
        if e.tags is None:
            continue
        try:
            check_scheme(e.tags, scheme)
        except TagError as err:
            raise _error(path, e.line, f"{err}. Fix the tag or convert the file to one scheme.") from None
        e.tags = to_iob2(e.tags, scheme)
    return examples, scheme


def _starts_with_b(examples: list[Example]) -> bool:
    """Whether any entity opens with B- right after O or at the start (never so in IOB1)."""
    for e in examples:
        prev = "O"
        for tag in e.tags or []:
            if tag.startswith("B-") and prev == "O":
                return True
            prev = tag
    return False


def _read_jsonl(path: Path, task: str, labelled: bool) -> list[Example]:
    out = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _error(path, number, f"not valid JSON ({e}).") from None
        if not isinstance(obj, dict):
            raise _error(path, number, "expected a JSON object.")
        out.append(parse_record(obj, task, labelled, lambda msg, n=number: _error(path, n, msg), number))
    return out


def parse_record(obj: dict, task: str, labelled: bool, error, number: int) -> Example:
    """One JSON object -> Example; `error(message)` builds the exception to raise."""
    if task == "classify" or ("text" in obj and "tokens" not in obj):
        if not isinstance(obj.get("text"), str):
            raise error('expected a string "text".')
        label = obj.get("label")
        if labelled and (label is None or isinstance(label, (dict, list))):
            raise error('expected a "label" (a string or a number).')
        return Example(number, text=obj["text"], label=None if label is None else str(label))
    tokens = obj.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise error('expected "tokens": a non-empty list of non-empty strings.')
    tags = obj.get("tags")
    if tags is None and labelled:
        raise error('expected "tags": one tag per token.')
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise error('"tags" must be a list of strings.')
        if len(tags) != len(tokens):
            raise error(f"{len(tokens)} tokens but {len(tags)} tags; every token needs exactly one tag.")
    predicate = None
    if task == "srl":
        predicate = obj.get("predicate")
        if not isinstance(predicate, int) or isinstance(predicate, bool) or not 0 <= predicate < len(tokens):
            raise error(f'expected "predicate": the index of the predicate token, 0 .. {len(tokens) - 1}.')
    return Example(number, tokens=tokens, tags=tags, predicate=predicate)


def _read_csv(path: Path, labelled: bool) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "text" not in reader.fieldnames or (labelled and "label" not in reader.fieldnames):
            raise _error(path, 1, f'the header must name a "text" and a "label" column (got {reader.fieldnames}).')
        out = []
        for row in reader:
            number = reader.line_num
            if row.get("text") is None or (labelled and not row.get("label")):
                raise _error(path, number, "a row without its text or label.")
            out.append(Example(number, text=row["text"], label=row.get("label") or None))
    return out


def _read_conll(path: Path, labelled: bool) -> list[Example]:
    out: list[Example] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate([*lines, ""], start=1):
        cols = text.split()
        if cols and cols[0] == "-DOCSTART-":
            continue
        if not cols:
            if tokens:
                out.append(Example(start, tokens=tokens, tags=tags if tags else None))
            tokens, tags = [], []
            continue
        if not tokens:
            start = number
        if labelled and len(cols) < 2:
            raise _error(path, number, f"expected a token and a tag (columns separated by spaces), got {text!r}.")
        tokens.append(cols[0])
        if len(cols) >= 2:
            tags.append(cols[-1])
        if tags and len(tags) != len(tokens):
            raise _error(path, number, "some tokens of this sentence have a tag and others do not.")
    return out


def _read_conll05(path: Path) -> list[Example]:
    """CoNLL-2005 propositions: one example per predicate of each sentence."""
    out: list[Example] = []
    rows: list[tuple[int, list[str]]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate([*lines, ""], start=1):
        cols = text.split()
        if cols:
            rows.append((number, cols))
            continue
        if not rows:
            continue
        width = len(rows[0][1])
        for n, cols in rows:
            if len(cols) != width:
                raise _error(path, n, f"{len(cols)} columns where the sentence's first line has {width}.")
        words = [cols[0] for _, cols in rows]
        n_props = width - 2 if width > 2 else 0
        targets = [i for i, (_, cols) in enumerate(rows) if cols[width - n_props - 1] != "-"] if n_props else []
        if len(targets) != n_props:
            raise _error(
                path, rows[0][0], f"{len(targets)} predicates in the target column but {n_props} proposition columns."
            )
        for p, target in enumerate(targets):
            column = [cols[width - n_props + p] for _, cols in rows]
            tags = _brackets_to_tags(path, rows, column)
            tags[target] = "O"  # the predicate itself is the input, not a role
            out.append(Example(rows[0][0], tokens=list(words), tags=tags, predicate=target))
        rows = []
    return out


def _brackets_to_tags(path: Path, rows: list, column: list[str]) -> list[str]:
    tags, open_role = [], None
    for (number, _), cell in zip(rows, column):
        opened = cell.startswith("(")
        role = cell[1:].split("*", 1)[0] if opened else None
        if opened and open_role is not None:
            raise _error(path, number, f"{cell!r} opens a role inside {open_role!r}.")
        if opened:
            tags.append(f"B-{role}")
            open_role = role
        else:
            tags.append(f"I-{open_role}" if open_role else "O")
        if cell.endswith(")"):
            if open_role is None:
                raise _error(path, number, f"{cell!r} closes a role that is not open.")
            open_role = None
    return [t if not t.endswith("-V") else "O" for t in tags]
