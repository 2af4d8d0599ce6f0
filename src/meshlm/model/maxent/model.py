"""A log-linear (maximum-entropy) n-gram language model on one device.

    p(w | history) = softmax_w( b_w + sum_{k=1}^{n-1} lambda_k[row_k(last k tokens), w] )

Each history length k has its own table lambda_k of `hash_rows` x V weights; row_k hashes the
last k tokens (and k) to a row. This is the hashed "direct n-gram connection" of RNNME-style
models (Mikolov et al. 2011), lambda[hash(history, w)], with the hash of (history, w) laid out
as row(history) * V + w: a table of rows by vocabulary, so that a slice of the vocabulary is a
slice of columns (what vocabulary-parallelism splits). The unigram feature is the bias b.

Before the start of a window, history positions hold a boundary symbol (-1), so a window's
first tokens are scored with the shorter context they have, the same in training, evaluation
and decoding.

Module layout (the family spec's contract):

    unigram      Unigram: weight (V,)                       the bias
    orders       nn.ModuleDict {"0": HashedNgram(k=1), "1": HashedNgram(k=2), ...}:
                 weight (hash_rows, V) each                 the repeated blocks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.maxent.config import MaxEntConfig
from meshlm.model.vocab_ops import LOCAL_VOCAB_OPS

BOUNDARY = -1  # the token id of history positions before the window start
_MOD = 2_147_483_647  # 2^31 - 1: products below stay inside int64
_MUL = 1_000_003


def history_rows(history: torch.Tensor, rows: int) -> torch.Tensor:
    """Table row of each history: history (..., k) token ids (BOUNDARY allowed) -> (...) int64.
    A polynomial hash of the k tokens, salted with k, modulo `rows`."""
    k = history.shape[-1]
    h = torch.full(history.shape[:-1], k, dtype=torch.int64, device=history.device)
    for j in range(k):
        h = (h * _MUL + history[..., j] + 1) % _MOD
    return h % rows


def histories(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """The last `length` tokens up to and including each position: tokens (B, T) -> (B, T, length)."""
    padded = F.pad(tokens, (length, 0), value=BOUNDARY)  # (B, length + T)
    return padded.unfold(1, length, 1)[:, 1:]  # window i ends at padded[i + length - 1]


class Unigram(nn.Module):
    """The bias: one weight per vocabulary entry (a `vocab_columns` table under tensor parallelism)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size))
        self.vocab_ops = LOCAL_VOCAB_OPS

    def forward(self) -> torch.Tensor:
        return self.weight  # (V,)


class HashedNgram(nn.Module):
    """The weights of the features whose history is the last k tokens."""

    def __init__(self, k: int, rows: int, vocab_size: int):
        super().__init__()
        self.k, self.rows = k, rows
        self.weight = nn.Parameter(torch.empty(rows, vocab_size))
        self.vocab_ops = LOCAL_VOCAB_OPS

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """history (..., n-1) -> this order's scores (..., V)."""
        return F.embedding(history_rows(history[..., history.shape[-1] - self.k :], self.rows), self.weight)

    def extra_repr(self) -> str:
        return f"k={self.k}, rows={self.rows}, vocab={self.weight.shape[-1]}"


class MaxEntLM(nn.Module):
    def __init__(self, cfg: MaxEntConfig):
        super().__init__()
        self.cfg = cfg
        self.unigram = Unigram(cfg.vocab_size)
        self.orders = nn.ModuleDict(
            {str(i): HashedNgram(i + 1, cfg.hash_rows, cfg.vocab_size) for i in range(cfg.order - 1)}
        )

    @property
    def history_length(self) -> int:
        return self.cfg.order - 1

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for p in self.parameters():
            if p.is_meta:
                continue
            if self.cfg.init_std > 0:
                nn.init.normal_(p, std=self.cfg.init_std, generator=generator)
            else:
                nn.init.zeros_(p)

    def tie_weights(self) -> None:
        pass

    def reset_buffers(self) -> None:
        pass

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities of the next token: history (..., n-1) -> (..., V)."""
        out = self.unigram()
        for block in self.orders.values():
            out = out + block(history)
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) of the token after each position."""
        return self.scores(histories(tokens, self.history_length))
