"""A maximum-entropy (multinomial log-linear) classifier over hashed word 1-2-gram features,
fitted by full-batch L-BFGS on the L2-regularised log-likelihood (torch, float64).

Data parallel exactly: the objective is a sum over examples, so ranks compute the loss and
gradient sums of their shares and one all-reduce gives the single-process totals (float64 sums
in a different order: equal to ~1e-12, tests/test_tasks_baselines.py). L-BFGS then takes the
same step on every rank.
"""

from __future__ import annotations

import re
import time
import zlib

import torch
import torch.distributed as dist

DIM = 2**18
TOKEN = re.compile(r"\w+")


def features(text: str) -> list[int]:
    words = [w.lower() for w in TOKEN.findall(text)]
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    return sorted({zlib.crc32(g.encode()) % DIM for g in grams})


def _design(texts: list[str]) -> torch.Tensor:
    rows, cols = [], []
    for i, t in enumerate(texts):
        f = features(t)
        rows += [i] * len(f)
        cols += f
    values = torch.ones(len(rows), dtype=torch.float64)
    indices = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(indices, values, (len(texts), DIM), check_invariants=False).coalesce()


def fit(texts: list[str], labels: list[int], n_labels: int, l2: float = 1.0, iters: int = 100, group=None):
    """Weights (DIM, L) and bias (L,) of this rank's share of the data (all of it on one process)."""
    X, y = _design(texts), torch.tensor(labels, dtype=torch.long)
    W = torch.zeros(DIM, n_labels, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([float(len(labels))], dtype=torch.float64)
    if group is not None or dist.is_initialized():
        dist.all_reduce(n, group=group)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = X @ W + b
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        loss.backward()
        total = torch.cat([loss.detach().reshape(1), W.grad.reshape(-1), b.grad])
        if dist.is_initialized():
            dist.all_reduce(total, group=group)  # the sums over every rank's share
        W.grad.copy_(total[1 : 1 + W.numel()].view_as(W) / n + l2 * W.detach() / n)
        b.grad.copy_(total[1 + W.numel() :] / n)
        return total[0] / n + 0.5 * l2 * (W.detach() ** 2).sum() / n

    opt.step(closure)
    return W.detach(), b.detach()


def fit_predict(task: str, train, test):
    labels = sorted({e.label for e in train})
    index = {name: i for i, name in enumerate(labels)}
    W, b = fit([e.text for e in train], [index[e.label] for e in train], len(labels))
    fitted = time.perf_counter()
    pred = (_design([e.text for e in test]) @ W + b).argmax(1).tolist()
    return [labels[i] for i in pred], fitted
