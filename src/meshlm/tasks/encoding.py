"""Examples -> fixed-length token arrays, and the model's scores -> labels and tags.

Every example becomes one row of `seq_len` tokens (truncated, then padded with the
end-of-text token): the same shape for every batch, which pipeline schedules need, and the
reason an example's scores do not depend on what else is in its batch.

    classify   the text's tokens and an end-of-text token; targets: the label id at the pooled
               positions (every token for mean pooling, the end-of-text token for "last")
    ner, srl   the words, each encoded with a leading space (as inside running text); targets:
               the word's tag id at its first subword (first-subword labelling); srl adds a
               second channel that flags the predicate's subwords
Targets are -1 where there is nothing to predict. Words cut off by the truncation are not
trained on and are predicted "O".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from meshlm.data.tokenizer import end_of_text_id
from meshlm.tasks.formats import DataError, Example

WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    """A plain text split into words and punctuation (for {"text"} inputs to a tagger)."""
    return WORD.findall(text)


@dataclass
class Encoded:
    x: np.ndarray  # (N, T) token ids, or (N, T, 2) with the predicate flags (srl)
    y: np.ndarray  # (N, T) label ids, -1 where nothing is predicted
    units: np.ndarray  # (N,) what the loss averages over per example: 1 (classify) or its labelled words
    starts: list[list[int]]  # per example: the first-subword position of each word kept (tagging)
    n_words: list[int]  # per example: its words (tagging; words past the truncation included)
    lengths: list[int]  # per example: its tokens (the rest of the row is padding)

    def __len__(self) -> int:
        return len(self.x)


def pad_id(tokenizer) -> int:
    eot = end_of_text_id(tokenizer)
    return 0 if eot is None else eot


def encode(
    examples: list[Example],
    tokenizer,
    task: str,
    labels: list[str],
    seq_len: int,
    pooling: str = "mean",
    source: str = "data",
) -> Encoded:
    """Encode `examples`; a gold label outside `labels` is an error naming the file and line."""
    index = {name: i for i, name in enumerate(labels)}
    pad = pad_id(tokenizer)
    N, T = len(examples), seq_len
    srl = task == "srl"
    x = np.full((N, T, 2) if srl else (N, T), pad, dtype=np.int64)
    if srl:
        x[..., 1] = 0
    y = np.full((N, T), -1, dtype=np.int64)
    units = np.zeros(N, dtype=np.int64)
    starts: list[list[int]] = []
    n_words: list[int] = []
    lengths: list[int] = []

    def label_id(e: Example, name: str) -> int:
        if name not in index:
            raise DataError(
                f"{source} line {e.line}: label {name!r} was not seen in training (the model knows: "
                f"{', '.join(labels[:30])}{' ...' if len(labels) > 30 else ''})."
            )
        return index[name]

    if task == "classify":
        encodings = tokenizer.encode_batch([e.text for e in examples], add_special_tokens=False)
        for i, (e, enc) in enumerate(zip(examples, encodings)):
            ids = enc.ids[: T - 1] + [pad]
            x[i, : len(ids)] = ids
            if e.label is not None:
                target = label_id(e, e.label)
                if pooling == "last":
                    y[i, len(ids) - 1] = target
                else:
                    y[i, : len(ids)] = target
            units[i] = 1
            starts.append([])
            n_words.append(0)
            lengths.append(len(ids))
        return Encoded(x, y, units, starts, n_words, lengths)

    words = [e.tokens if e.tokens is not None else words_of(e.text or "") for e in examples]
    spaced = [[w if j == 0 else " " + w for j, w in enumerate(ws)] for ws in words]
    encodings = tokenizer.encode_batch(spaced, is_pretokenized=True, add_special_tokens=False)
    for i, (e, ws, enc) in enumerate(zip(examples, words, encodings)):
        ids, word_ids = enc.ids[:T], enc.word_ids[:T]
        x_row = x[i, :, 0] if srl else x[i]
        x_row[: len(ids)] = ids
        first = []
        seen = set()
        for pos, w in enumerate(word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                first.append(pos)
            if srl and w is not None and w == e.predicate:
                x[i, pos, 1] = 1
        starts.append(first)
        n_words.append(len(ws))
        lengths.append(len(ids))
        if e.tags is not None:
            for w, pos in enumerate(first):
                y[i, pos] = label_id(e, e.tags[w])
        units[i] = len(first) if e.tags is not None else 0
    return Encoded(x, y, units, starts, n_words, lengths)


def label_set(task: str, examples: list[Example]) -> list[str]:
    """The labels of the training data in head order: sorted classes; or O then B-/I- of each
    type (types sorted)."""
    if task == "classify":
        return sorted({e.label for e in examples}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    types = sorted({t.split("-", 1)[1] for e in examples for t in e.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
