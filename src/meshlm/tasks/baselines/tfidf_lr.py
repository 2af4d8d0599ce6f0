"""TF-IDF word 1-2-grams and character 2-5-grams + scikit-learn's LogisticRegression."""

from __future__ import annotations

import time


def fit_predict(task: str, train, test):
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    words = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True)
    texts = [e.text for e in train]
    X = hstack([words.fit_transform(texts), chars.fit_transform(texts)]).tocsr()
    model = LogisticRegression(C=10.0, max_iter=2000).fit(X, [e.label for e in train])
    fitted = time.perf_counter()
    X_test = hstack([words.transform([e.text for e in test]), chars.transform([e.text for e in test])]).tocsr()
    return list(model.predict(X_test)), fitted
