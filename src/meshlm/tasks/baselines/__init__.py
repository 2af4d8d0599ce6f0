"""Classical baselines on the same splits, reported beside the fine-tuned models
(benchmarks/tasks.py): TF-IDF n-grams + logistic regression and a MaxEnt classifier (text
classification), a CRF with standard lexical features and a supervised HMM (tagging).

    python -m meshlm.tasks.baselines --method crf --task ner --train T --test E

Each `run_<method>(task, train, test)` returns {"scores": ..., "train_seconds": ...}; the scores
are the metrics of tasks/metrics.py (accuracy / macro-F1, or span precision / recall / F1).
"""

from __future__ import annotations

import time

from meshlm.tasks.metrics import classification_scores, confusion, entity_types, span_counts, span_scores

METHODS = {"classify": ("tfidf-lr", "maxent"), "ner": ("crf", "hmm"), "srl": ("crf", "hmm")}


def score_classification(gold: list[str], pred: list[str]) -> dict:
    labels = sorted(set(gold) | set(pred))
    index = {name: i for i, name in enumerate(labels)}
    return classification_scores(confusion([index[g] for g in gold], [index[p] for p in pred], len(labels)), labels)


def score_tagging(gold: list[list[str]], pred: list[list[str]]) -> dict:
    types = entity_types(sorted({t for seq in gold + pred for t in seq}))
    return span_scores(span_counts(gold, pred, types), types)


def run(method: str, task: str, train, test) -> dict:
    """Fit `method` on the `train` examples and score it on `test` (tasks.formats.Example lists)."""
    started = time.perf_counter()
    if method == "tfidf-lr":
        from meshlm.tasks.baselines.tfidf_lr import fit_predict
    elif method == "maxent":
        from meshlm.tasks.baselines.maxent import fit_predict
    elif method == "crf":
        from meshlm.tasks.baselines.crf import fit_predict
    elif method == "hmm":
        from meshlm.tasks.baselines.hmm import fit_predict
    else:
        raise ValueError(f"unknown baseline {method!r}")
    pred, fitted = fit_predict(task, train, test)
    seconds = fitted - started
    if task == "classify":
        scores = score_classification([e.label for e in test], pred)
    else:
        scores = score_tagging([e.tags for e in test], pred)
    scores.pop("per_label", None)
    return {"method": method, "task": task, "scores": scores, "train_seconds": seconds}
