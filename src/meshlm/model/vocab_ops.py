"""Reductions over the vocabulary on one device: the default `vocab_ops` of a module whose
tensors have the vocabulary as their last dimension (tensor-parallel plan style
`vocab_columns`; the VocabOps protocol in meshlm.model.spec). Tensor parallelism swaps them
for collectives over the vocabulary slices (meshlm.parallel.vocab_parallel), which is how a
family computes, for instance, a softmax normaliser over a vocabulary it holds only a slice of
without importing torch.distributed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalVocabOps:
    """The whole vocabulary is here: plain torch ops."""

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(x, dim=-1)

    def select(self, table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, table.t())  # (..., R)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __repr__(self) -> str:
        return "LocalVocabOps()"


LOCAL_VOCAB_OPS = LocalVocabOps()
