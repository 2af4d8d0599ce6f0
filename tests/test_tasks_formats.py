"""Task data formats: every format read, tag schemes detected and normalised, word labels aligned
to subwords and back; and each kind of bad data refused with its file and line."""

from __future__ import annotations

import json

import pytest
from task_fixtures import make_backbone

from meshlm.config import ConfigError
from meshlm.data.tokenizer import load_tokenizer
from meshlm.tasks.encoding import encode, label_set
from meshlm.tasks.formats import DataError, read_examples


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


CONLL_IOB1 = "-DOCSTART- -X- O\n\nJohn NNP I-PER\nSmith NNP I-PER\nin IN O\nNew NNP I-LOC\nYork NNP I-LOC\n\nParis NNP I-LOC\nB B-LOC\n"


def test_conll_iob1_is_detected_and_normalised(tmp_path):
    examples, scheme = read_examples(_write(tmp_path, "a.conll", CONLL_IOB1), "ner")
    assert scheme == "IOB1"
    assert examples[0].tokens == ["John", "Smith", "in", "New", "York"]
    assert examples[0].tags == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    assert examples[1].tags == ["B-LOC", "B-LOC"]  # IOB1's B- separates two adjacent LOCs
    assert examples[0].line == 3 and examples[1].line == 9


def test_bioes_jsonl_is_detected_and_normalised(tmp_path):
    rec = {"tokens": ["a", "b", "c", "d"], "tags": ["B-X", "E-X", "S-Y", "O"]}
    examples, scheme = read_examples(_write(tmp_path, "a.jsonl", json.dumps(rec) + "\n"), "ner")
    assert scheme == "BIOES" and examples[0].tags == ["B-X", "I-X", "B-Y", "O"]


def test_classification_csv_and_srl_conll05(tmp_path):
    examples, _ = read_examples(_write(tmp_path, "a.csv", 'text,label\n"hello, world",greet\nbye,leave\n'), "classify")
    assert [(e.text, e.label, e.line) for e in examples] == [("hello, world", "greet", 2), ("bye", "leave", 3)]
    conll05 = "The - (A0* *\ncat - *) *\nate eat (V*) *\nfish - (A1*) *\nand - * *\nslept sleep * (V*)\n"
    examples, _ = read_examples(_write(tmp_path, "a.props", conll05), "srl")
    assert [(e.predicate, e.tags) for e in examples] == [
        (2, ["B-A0", "I-A0", "O", "B-A1", "O", "O"]),
        (5, ["O", "O", "O", "O", "O", "O"]),
    ]


BAD = {
    "unknown scheme": ("a.conll", "John X-PER\n", "line 1: unknown tag scheme"),
    "I after O under IOB2": (
        "a.conll",
        "John B-PER\nSmith I-PER\n\nin O\nParis I-LOC\n",
        "line 4: .*IOB2 starts every entity",
    ),
    "counts differ": ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "line 1: 2 tokens but 1 tags"),
    "missing tag column": ("a.conll", "John B-PER\nSmith\n", "line 2: expected a token and a tag"),
    "empty file": ("a.jsonl", "", "line 1: the file is empty"),
    "not json": ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{oops\n', "line 2: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tagging_data_names_file_and_line(case, tmp_path):
    name, text, message = BAD[case]
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=f"{path} {message}"):
        read_examples(path, "ner")


def test_bad_classification_and_srl_data(tmp_path):
    path = _write(tmp_path, "c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match='line 2: expected a "label"'):
        read_examples(path, "classify")
    path = _write(tmp_path, "s.jsonl", '{"tokens": ["a"], "tags": ["O"], "predicate": 3}\n')
    with pytest.raises(DataError, match='line 1: expected "predicate"'):
        read_examples(path, "srl")


def test_label_unseen_in_training_is_refused_with_its_line(tmp_path):
    backbone = make_backbone(tmp_path / "bb")
    train, _ = read_examples(_write(tmp_path, "t.jsonl", '{"text": "a", "label": "x"}\n'), "classify")
    valid, _ = read_examples(
        _write(tmp_path, "v.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'), "classify"
    )
    with pytest.raises(ConfigError, match="v.jsonl line 2: label 'y' was not seen in training"):
        encode(
            valid,
            load_tokenizer(backbone / "tokenizer.json"),
            "classify",
            label_set("classify", train),
            16,
            source=str(tmp_path / "v.jsonl"),
        )


def test_first_subword_alignment(tmp_path):
    """Each word's tag sits at its first subword; the others and the padding are not trained on."""
    backbone = make_backbone(tmp_path / "bb")
    tok = load_tokenizer(backbone / "tokenizer.json")
    rec = {"tokens": ["John", "Smithsonianish", "sat"], "tags": ["B-PER", "I-PER", "O"]}
    examples, _ = read_examples(_write(tmp_path, "a.jsonl", json.dumps(rec) + "\n"), "ner")
    labels = label_set("ner", examples)
    enc = encode(examples, tok, "ner", labels, 16)
    starts = enc.starts[0]
    assert len(starts) == 3 and starts[0] == 0 and starts[2] - starts[1] > 1  # the long word has several subwords
    assert [labels[enc.y[0, p]] for p in starts] == rec["tags"]
    assert (enc.y[0] >= 0).sum() == 3 and enc.units[0] == 3
    pieces = [tok.decode(enc.x[0, a:b].tolist()) for a, b in zip(starts, starts[1:] + [enc.lengths[0]])]
    assert pieces == ["John", " Smithsonianish", " sat"]
