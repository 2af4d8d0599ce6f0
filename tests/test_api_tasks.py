"""The Python API's task models: scikit-learn estimators over a fitted LanguageModel backbone
(fit / predict / score, clone, cross_val_score), fine-tuning on two workers equal to one."""

from __future__ import annotations

import numpy as np
import pytest

import meshlm

TINY = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=2,
    vocab_size=512,
    max_seq_len=64,
    seq_len=32,
    micro_batch=4,
    global_batch=8,
    warmup_steps=1,
    eval_every=0,
    sample_tokens=0,
    max_bytes=200_000,
)

# Two classes a tiny model can tell apart: code and prose.
CODE = [f"def f{i}(x): return x + {i}" for i in range(12)]
PROSE = [f"the river number {i} runs slowly to the sea" for i in range(12)]
X = [t for pair in zip(CODE, PROSE) for t in pair]
Y = [label for _ in range(12) for label in (1, 0)]  # ints: predictions come back as the same objects
WORDS = [["def", f"name{i}", "(", "x", ")"] for i in range(10)]
TAGS = [["O", "B-FUNC", "O", "B-PARAM", "O"] for _ in range(10)]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-tasks")
    lm = meshlm.LanguageModel("tiny-cpu", cache_dir=str(root / "cache"), **TINY)
    lm.fit(steps=2, run_dir=root / "backbone", verbose=False)
    return lm


def test_classifier_fit_predict_score_and_two_workers(backbone, tmp_path):
    # Dropout masks are drawn per rank, so equality with one process needs task.dropout=0 (as in
    # tests/test_tasks_parallel.py); the default 0.1 trains equally well but not identically.
    exact = {"task.dropout": 0.0}
    clf = meshlm.TextClassifier(backbone=backbone, steps=3, overrides=exact, run_dir=tmp_path / "one")
    assert clf.fit(X, Y, validation_data=(X[:6], Y[:6])) is clf
    assert sorted(clf.classes_.tolist()) == [0, 1]
    pred = clf.predict(X)
    assert pred.shape == (len(X),) and set(pred.tolist()) <= {0, 1}
    # score is `meshlm eval` on the task run: the accuracy of what predict returns.
    assert clf.score(X, Y) == pytest.approx(float(np.mean(pred == np.array(Y))))
    assert clf.predict(X, workers=2).tolist() == pred.tolist()
    # Fine-tuning on two worker processes (dp2) gives the losses of one process.
    two = meshlm.TextClassifier(backbone=backbone, steps=3, workers=2, overrides=exact, run_dir=tmp_path / "two")
    two.fit(X, Y, validation_data=(X[:6], Y[:6]))
    a, b = clf.history_.history["loss"], two.history_.history["loss"]
    assert len(a) == 3 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)
    again = meshlm.load(clf.run_dir_)
    assert isinstance(again, meshlm.TextClassifier)
    assert again.predict(X[:4]).tolist() == [str(p) for p in pred[:4]]  # loaded: labels as the run stores them


def test_scikit_learn_conventions(backbone):
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    clf = meshlm.TextClassifier(backbone=backbone, steps=2, overrides={"train.lr": 2e-3})
    params = clf.get_params()
    assert params["steps"] == 2 and params["overrides"] == {"train.lr": 2e-3}
    assert clone(clf).get_params()["steps"] == 2
    assert clf.set_params(steps=1) is clf and clf.steps == 1
    with pytest.raises(ValueError, match="no parameter 'stepz'"):
        clf.set_params(stepz=3)
    scores = cross_val_score(meshlm.TextClassifier(backbone=backbone, steps=2), X, Y, cv=3)
    assert scores.shape == (3,) and all(0.0 <= s <= 1.0 for s in scores)


def test_tagger(backbone, tmp_path):
    tagger = meshlm.Tagger("ner", backbone=backbone, steps=2, run_dir=tmp_path / "ner")
    tagger.fit(WORDS, TAGS)
    tags = tagger.predict(WORDS[:3])
    assert [len(t) for t in tags] == [5, 5, 5]
    assert all(tag in ("O", "B-FUNC", "I-FUNC", "B-PARAM", "I-PARAM") for t in tags for tag in t)
    assert 0.0 <= tagger.score(WORDS, TAGS) <= 1.0
    with pytest.raises(ValueError, match='must be "ner" or "srl"'):
        meshlm.Tagger("classify", backbone=backbone).fit(WORDS, TAGS)
