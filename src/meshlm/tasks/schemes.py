"""Tag schemes (IOB1, IOB2, BIOES): detection, normalisation to IOB2, spans, and back.

    IOB2    every entity starts with B-, continues with I- (what meshlm trains on)
    IOB1    I- starts an entity too; B- only separates two adjacent entities of one type
    BIOES   B- I- ... E- for several tokens, S- for one

`get_entities` is the span reader of seqeval (and conlleval) in its default, lenient mode,
so span precision / recall / F1 computed from it equal seqeval's on any tag sequence, valid or
not (tests/test_tasks_metrics.py checks this against seqeval itself).
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEMES = ("IOB1", "IOB2", "BIOES")


class TagError(ValueError):
    """A tag sequence that breaks its scheme; the message says how (the caller adds file and line)."""


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise TagError(f"tag {tag!r} is neither O nor PREFIX-TYPE with PREFIX one of B, I, E, S")
    return prefix, kind


def detect_scheme(sequences: Sequence[Sequence[str]]) -> str:
    """IOB2 unless the data says otherwise: E- or S- tags mean BIOES; an I- tag that starts an
    entity (after O, at the start, or after another type) with no B- used that way means IOB1."""
    prefixes = set()
    iob1_start = False
    for tags in sequences:
        prev = ("O", "")
        for tag in tags:
            p, k = split_tag(tag)
            prefixes.add(p)
            if p == "I" and (prev[0] == "O" or prev[1] != k):
                iob1_start = True
            prev = (p, k)
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "IOB1" if iob1_start else "IOB2"


def check_scheme(tags: Sequence[str], scheme: str) -> None:
    """Raise TagError naming the position of the first tag the scheme does not allow."""
    prev_p, prev_k = "O", ""
    for i, tag in enumerate(tags):
        p, k = split_tag(tag)
        if scheme in ("IOB1", "IOB2") and p in ("E", "S"):
            raise TagError(f"token {i + 1}: {tag!r} is a BIOES tag in {scheme} data")
        if scheme == "IOB2" and p == "I" and (prev_p == "O" or prev_k != k):
            after = "the start" if i == 0 else repr(tags[i - 1])
            raise TagError(f"token {i + 1}: {tag!r} after {after} (IOB2 starts every entity with B-)")
        if scheme == "BIOES":
            if p in ("I", "E") and (prev_p not in ("B", "I") or prev_k != k):
                raise TagError(f"token {i + 1}: {tag!r} does not continue a B-{k} (BIOES)")
            if prev_p in ("B", "I") and not (p in ("I", "E") and k == prev_k):
                raise TagError(f"token {i + 1}: {tag!r} after {tags[i - 1]!r}, which must be followed by I-/E-{prev_k}")
        prev_p, prev_k = p, k
    if scheme == "BIOES" and prev_p in ("B", "I"):
        raise TagError(f"the sequence ends inside an entity ({tags[-1]!r}); BIOES closes it with E-")


def spans_of(tags: Sequence[str], scheme: str) -> list[tuple[str, int, int]]:
    """Entities (type, first, last) of a valid sequence in `scheme`."""
    spans, start, kind = [], None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        p, k = split_tag(tag)
        begins = p in ("B", "S") or (p == "I" and (start is None or k != kind))
        if start is not None and (p == "O" or begins):
            spans.append((kind, start, i - 1))
            start = None
        if p != "O" and start is None:
            start, kind = i, k
        if p in ("E", "S") and start is not None:
            spans.append((kind, start, i))
            start = None
    return spans


def tags_from_spans(spans: Sequence[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    """The tags of `n` tokens holding `spans` (non-overlapping) in `scheme`."""
    tags = ["O"] * n
    ordered = sorted(spans, key=lambda s: s[1])
    for j, (kind, first, last) in enumerate(ordered):
        if scheme == "BIOES" and first == last:
            tags[first] = f"S-{kind}"
            continue
        adjacent_same = j > 0 and ordered[j - 1][2] == first - 1 and ordered[j - 1][0] == kind
        opener = "B" if scheme != "IOB1" or adjacent_same else "I"
        tags[first] = f"{opener}-{kind}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{kind}"
        if scheme == "BIOES":
            tags[last] = f"E-{kind}"
    return tags


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    return tags_from_spans(spans_of(tags, scheme), len(tags), "IOB2")


# ----------------------------------------------------------------------------- seqeval's reader


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag == "E"
        or prev_tag == "S"
        or (prev_tag == "B" and tag in ("B", "S", "O"))
        or (prev_tag == "I" and tag in ("B", "S", "O"))
        or (prev_tag != "O" and prev_tag != "." and prev_type != type_)
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag == "B"
        or tag == "S"
        or (prev_tag == "E" and tag in ("E", "I"))
        or (prev_tag == "S" and tag in ("E", "I"))
        or (prev_tag == "O" and tag in ("E", "I"))
        or (tag != "O" and tag != "." and prev_type != type_)
    )


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks (type, first, last) of any tag sequence, read as seqeval's default mode and
    conlleval read them (lenient: an I- after O starts a chunk, a type change ends one)."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks
