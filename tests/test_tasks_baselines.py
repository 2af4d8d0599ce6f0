"""The classical baselines: each fits and scores on small data, and the two that train data
parallel do so exactly as one process (HMM counts equal; MaxEnt weights within 1e-9)."""

from __future__ import annotations

import numpy as np
import torch
from task_fixtures import classify_records, ner_records

from meshlm.distributed.spawn import run_distributed
from meshlm.tasks.baselines import hmm, maxent, run
from meshlm.tasks.formats import Example


def _tagged(n, seed, predicate=False):
    return [
        Example(i, tokens=r["tokens"], tags=r["tags"], predicate=r.get("predicate"))
        for i, r in enumerate(ner_records(n, seed, predicate))
    ]


def _texts(n, seed):
    return [Example(i, text=r["text"], label=r["label"]) for i, r in enumerate(classify_records(n, seed))]


def test_every_baseline_learns_the_toy_tasks():
    for method, task, train, test in [
        ("tfidf-lr", "classify", _texts(120, 1), _texts(40, 2)),
        ("maxent", "classify", _texts(120, 1), _texts(40, 2)),
        ("crf", "ner", _tagged(60, 1), _tagged(30, 2)),
        ("hmm", "ner", _tagged(60, 1), _tagged(30, 2)),
        ("crf", "srl", _tagged(60, 1, True), _tagged(30, 2, True)),
    ]:
        scores = run(method, task, train, test)["scores"]
        assert scores.get("accuracy", scores.get("f1")) > 0.7, (method, task, scores)


def _hmm_rank(rank, train):
    model = hmm.build(train)
    model.count(train[rank::2])
    model.all_reduce()
    return model.start, model.trans, model.emit


def test_hmm_counts_data_parallel_equal_one_process():
    train = _tagged(50, 3)
    single = hmm.build(train)
    single.count(train)
    for start, trans, emit in run_distributed(_hmm_rank, 2, train):
        assert np.array_equal(start, single.start) and np.array_equal(trans, single.trans)
        assert np.array_equal(emit, single.emit)


def _maxent_rank(rank, texts, labels):
    W, b = maxent.fit(texts[rank::2], labels[rank::2], 3, iters=30)
    return W.numpy(), b.numpy()  # tensors would travel as shared memory that the exiting rank frees


def test_maxent_gradient_data_parallel_equals_one_process():
    data = _texts(60, 4)
    names = sorted({e.label for e in data})
    texts, labels = [e.text for e in data], [names.index(e.label) for e in data]
    W, b = maxent.fit(texts, labels, 3, iters=30)
    for W2, b2 in run_distributed(_maxent_rank, 2, texts, labels):
        assert torch.allclose(torch.from_numpy(W2), W, atol=1e-9) and torch.allclose(torch.from_numpy(b2), b, atol=1e-9)
