"""Span precision / recall / F1 equal seqeval's on random tag sequences (valid or not, IOB2 and
BIOES), and accuracy / macro-F1 equal scikit-learn's."""

from __future__ import annotations

import random

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sk_f1

from meshlm.tasks.metrics import classification_scores, confusion, span_counts, span_scores
from meshlm.tasks.schemes import get_entities, spans_of, tags_from_spans, to_iob2

TYPES = ["LOC", "MISC", "ORG", "PER"]


def _random_tags(rnd: random.Random, prefixes: str, n: int) -> list[str]:
    return ["O" if rnd.random() < 0.4 else f"{rnd.choice(prefixes)}-{rnd.choice(TYPES)}" for _ in range(n)]


@pytest.mark.parametrize("prefixes", ["BI", "BIES"])
def test_span_scores_equal_seqeval_on_random_sequences(prefixes):
    rnd = random.Random(len(prefixes))
    for trial in range(30):
        gold = [_random_tags(rnd, prefixes, rnd.randint(1, 12)) for _ in range(rnd.randint(1, 20))]
        pred = [[t if rnd.random() < 0.6 else _random_tags(rnd, prefixes, 1)[0] for t in g] for g in gold]
        ours = span_scores(span_counts(gold, pred, TYPES), TYPES)
        assert ours["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12), trial
        assert ours["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12), trial
        assert ours["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12), trial
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        for kind in TYPES:
            if kind in report:
                assert ours["per_type"][kind]["f1"] == pytest.approx(report[kind]["f1-score"], abs=1e-12)
                assert ours["per_type"][kind]["support"] == report[kind]["support"]


def test_classification_scores_equal_scikit_learn():
    rnd = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(6)]
    for _ in range(20):
        gold = rnd.integers(0, 6, 50)
        pred = np.where(rnd.random(50) < 0.5, gold, rnd.integers(0, 5, 50))
        scores = classification_scores(confusion(gold, pred, 6), labels)
        assert scores["accuracy"] == pytest.approx(accuracy_score(gold, pred))
        assert scores["macro_f1"] == pytest.approx(sk_f1(gold, pred, average="macro", zero_division=0))


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2", "BIOES"])
def test_scheme_round_trip(scheme):
    """Spans -> tags in a scheme -> IOB2 -> spans is the identity, also for adjacent entities."""
    rnd = random.Random(1)
    for _ in range(100):
        n, spans, i = rnd.randint(1, 15), [], 0
        while i < n:
            if rnd.random() < 0.5:
                length = rnd.randint(1, 3)
                spans.append((rnd.choice(TYPES[:2]), i, min(n, i + length) - 1))
                i += length
            else:
                i += rnd.randint(1, 2)
        tags = tags_from_spans(spans, n, scheme)
        assert spans_of(tags, scheme) == sorted(spans, key=lambda s: s[1])
        assert get_entities(to_iob2(tags, scheme)) == sorted(spans, key=lambda s: s[1])
