"""The field's metrics: accuracy and macro-F1 for classification; entity-level (span)
precision, recall and F1 per type and micro-averaged for tagging, equal to seqeval's default
mode (and conlleval's) on the same predictions. Everything is computed from sums (a confusion
matrix, per-type counts), which add up over batches and ranks: evaluation under any layout
reduces the sums, then derives the scores once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meshlm.tasks.schemes import get_entities


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def confusion(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> np.ndarray:
    """counts[gold, predicted]."""
    m = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(m, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def classification_scores(conf: np.ndarray, labels: Sequence[str]) -> dict:
    """accuracy, macro_f1 (over the labels that occur in the gold or the predictions, as
    scikit-learn's f1_score(average="macro")) and per-label precision / recall / F1 / support."""
    conf = np.asarray(conf, dtype=np.float64)
    tp, gold, pred = np.diag(conf), conf.sum(1), conf.sum(0)
    per_label, f1s = {}, []
    for i, name in enumerate(labels):
        p, r = _div(tp[i], pred[i]), _div(tp[i], gold[i])
        per_label[name] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": int(gold[i])}
        if gold[i] + pred[i] > 0:
            f1s.append(_f1(p, r))
    return {
        "accuracy": _div(tp.sum(), conf.sum()),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "examples": int(conf.sum()),
        "per_label": per_label,
    }


def span_counts(
    gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]], types: Sequence[str]
) -> np.ndarray:
    """Per type: [true positives, predicted, gold] entities, (len(types), 3); seqeval's reading
    of each sequence (lenient chunks, exact type and boundaries)."""
    index = {t: i for i, t in enumerate(types)}
    counts = np.zeros((len(types), 3), dtype=np.int64)
    for gold, pred in zip(gold_tags, pred_tags):
        g, p = set(get_entities(list(gold))), set(get_entities(list(pred)))
        for kind, *_ in g & p:
            counts[index[kind], 0] += 1
        for kind, *_ in p:
            counts[index[kind], 1] += 1
        for kind, *_ in g:
            counts[index[kind], 2] += 1
    return counts


def span_scores(counts: np.ndarray, types: Sequence[str]) -> dict:
    """Micro-averaged precision / recall / f1 and the same per type (with its gold support)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(len(types), 3)
    per_type = {}
    for i, t in enumerate(types):
        p, r = _div(counts[i, 0], counts[i, 1]), _div(counts[i, 0], counts[i, 2])
        per_type[t] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": int(counts[i, 2])}
    tp, n_pred, n_gold = counts.sum(0)
    p, r = _div(tp, n_pred), _div(tp, n_gold)
    return {"precision": p, "recall": r, "f1": _f1(p, r), "entities": int(n_gold), "per_type": per_type}


def entity_types(labels: Sequence[str]) -> list[str]:
    """The entity types of an IOB2 label set, sorted."""
    return sorted({lab.split("-", 1)[1] for lab in labels if lab != "O"})


def per_type_table(scores: dict) -> str:
    """A Markdown table of per-label (classification) or per-type (spans) scores."""
    rows = scores.get("per_type") or scores.get("per_label") or {}
    lines = ["| label | precision | recall | f1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(conf: np.ndarray, labels: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(conf)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5)))
    rates = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(
                        j,
                        i,
                        str(conf[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if rates[i, j] < 0.6 else "white",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the gold row")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
