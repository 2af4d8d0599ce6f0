"""A supervised (first-order) HMM tagger: transition and emission counts from the gold tags,
add-k smoothing, unknown words by their shape class, Viterbi decoding. For SRL the state is
the tag and the observation the word marked with its side of the predicate.

Data parallel exactly: the counts are sums over sentences, so each rank counts its share and
one all-reduce of the (integer-valued, float64) count arrays gives the single process's counts.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

UNK_CLASSES = ("<num>", "<title>", "<upper>", "<punct>", "<unk>")


def _observation(word: str, i: int, predicate: int | None) -> str:
    if predicate is None:
        return word
    side = "=" if i == predicate else "<" if i < predicate else ">"
    return side + word


def _shape(word: str) -> str:
    w = word.lstrip("<>=")
    if w.isdigit():
        return "<num>"
    if w.istitle():
        return "<title>"
    if w.isupper():
        return "<upper>"
    if not any(c.isalnum() for c in w):
        return "<punct>"
    return "<unk>"


class HMMTagger:
    def __init__(self, tags: list[str], vocab: list[str], smoothing: float = 0.1):
        self.tags, self.smoothing = tags, smoothing
        self.vocab = {w: i for i, w in enumerate(list(vocab) + list(UNK_CLASSES))}
        S, V = len(tags), len(self.vocab)
        self.start, self.trans, self.emit = np.zeros(S), np.zeros((S, S)), np.zeros((S, V))

    def _obs_id(self, obs: str) -> int:
        return self.vocab.get(obs, self.vocab[_shape(obs)])

    def count(self, examples) -> None:
        index = {t: i for i, t in enumerate(self.tags)}
        for e in examples:
            states = [index[t] for t in e.tags]
            obs = [self._obs_id(_observation(w, i, e.predicate)) for i, w in enumerate(e.tokens)]
            self.start[states[0]] += 1
            for a, b in zip(states, states[1:]):
                self.trans[a, b] += 1
            for s, o in zip(states, obs):
                self.emit[s, o] += 1

    def all_reduce(self, group=None) -> None:
        """Sum the counts over the ranks (each rank counted its share)."""
        flat = torch.from_numpy(np.concatenate([self.start, self.trans.ravel(), self.emit.ravel()]))
        dist.all_reduce(flat, group=group)
        S = len(self.tags)
        flat = flat.numpy()
        self.start, self.trans = flat[:S].copy(), flat[S : S + S * S].reshape(S, S).copy()
        self.emit = flat[S + S * S :].reshape(self.emit.shape).copy()

    def finish(self) -> None:
        """Counts -> log probabilities (add-k); rare words' counts also feed their shape class."""
        k = self.smoothing
        self.log_start = np.log((self.start + k) / (self.start + k).sum())
        self.log_trans = np.log((self.trans + k) / (self.trans + k).sum(1, keepdims=True))
        emit = self.emit.copy()
        for w, i in self.vocab.items():
            if w not in UNK_CLASSES and self.emit[:, i].sum() <= 1:
                emit[:, self.vocab[_shape(w)]] += self.emit[:, i]
        self.log_emit = np.log((emit + k) / (emit + k).sum(1, keepdims=True))

    def tag(self, tokens: list[str], predicate: int | None = None) -> list[str]:
        obs = [self._obs_id(_observation(w, i, predicate)) for i, w in enumerate(tokens)]
        score = self.log_start + self.log_emit[:, obs[0]]
        back = []
        for o in obs[1:]:
            total = score[:, None] + self.log_trans
            back.append(total.argmax(0))
            score = total.max(0) + self.log_emit[:, o]
        path = [int(score.argmax())]
        for ptr in reversed(back):
            path.append(int(ptr[path[-1]]))
        return [self.tags[s] for s in reversed(path)]


def build(train) -> HMMTagger:
    tags = sorted({t for e in train for t in e.tags})
    vocab = sorted({_observation(w, i, e.predicate) for e in train for i, w in enumerate(e.tokens)})
    return HMMTagger(tags, vocab)


def fit_predict(task: str, train, test):
    model = build(train)
    model.count(train)
    model.finish()
    fitted = time.perf_counter()
    return [model.tag(e.tokens, e.predicate) for e in test], fitted
