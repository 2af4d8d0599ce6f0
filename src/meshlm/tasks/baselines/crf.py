"""A linear-chain CRF (sklearn-crfsuite, L-BFGS with L1 + L2) over the standard lexical features
of each word and its neighbours (as in sklearn-crfsuite's CoNLL tutorial); for SRL also the
predicate word and each word's distance to it."""

from __future__ import annotations

import time


def _word(w: str, prefix: str) -> dict:
    return {
        f"{prefix}lower": w.lower(),
        f"{prefix}suffix3": w[-3:],
        f"{prefix}suffix2": w[-2:],
        f"{prefix}prefix2": w[:2],
        f"{prefix}istitle": w.istitle(),
        f"{prefix}isupper": w.isupper(),
        f"{prefix}isdigit": w.isdigit(),
        f"{prefix}isalpha": w.isalpha(),
        f"{prefix}shape": "".join("X" if c.isupper() else "x" if c.islower() else "d" if c.isdigit() else c for c in w)[
            :6
        ],
    }


def sentence_features(tokens: list[str], predicate: int | None = None) -> list[dict]:
    out = []
    for i, w in enumerate(tokens):
        f = {"bias": 1.0, **_word(w, "")}
        for off in (-2, -1, 1, 2):
            j = i + off
            if 0 <= j < len(tokens):
                f.update(
                    {f"{off}:{k}": v for k, v in _word(tokens[j], "").items() if k in ("lower", "istitle", "suffix3")}
                )
            else:
                f[f"{off}:pad"] = True
        if predicate is not None:
            d = i - predicate
            f.update(
                {"pred": tokens[predicate].lower(), "dist": str(max(-5, min(5, d))), "before": d < 0, "is_pred": d == 0}
            )
        out.append(f)
    return out


def fit_predict(task: str, train, test):
    import sklearn_crfsuite

    crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.1, c2=0.1, max_iterations=100, all_possible_transitions=True)
    crf.fit([sentence_features(e.tokens, e.predicate) for e in train], [e.tags for e in train])
    fitted = time.perf_counter()
    return [list(p) for p in crf.predict([sentence_features(e.tokens, e.predicate) for e in test])], fitted
