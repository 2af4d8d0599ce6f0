"""Hashed n-gram embeddings: fastText's bag of n-grams beside a task model's backbone.

Each position t gets the vectors of the token n-grams that end at it (orders 1 .. `orders`:
x_t, x_{t-1} x_t, x_{t-2} x_{t-1} x_t), hashed into `buckets` rows of a small table (width
`dim`), summed and projected to the backbone's output width; the task model adds the result to
the backbone's output, where the head reads it (task_model.py). The head's scores are then the
backbone's plus a linear model's over the text's n-grams (a "wide and deep" model; with mean
pooling, fastText's classifier): on small labelled sets the linear part is what a 1M-parameter
backbone alone lacks (docs/benchmarks.md, "Tasks").

The hash is a fixed function of the token ids (int64 arithmetic, no Python hash), so every
process, layout and device computes the same rows. Positions before the text's start count as
an id of their own, so an n-gram at the start differs from one in the middle. The projection
starts at zero: the task model starts as the pretrained backbone and learns how much of the
n-gram path to use.
"""

from __future__ import annotations

import torch
from torch import nn

# The table's rows are stored 1/SCALE as large and multiplied back by SCALE: under Adam a row
# then moves SCALE times as fast as the backbone's weights at the fine-tuning learning rate (a
# bag of n-grams trained alone wanted ~10x the backbone's 1e-3), with no optimizer setting of
# its own, so every optimizer path (ZeRO's flat buffers included) treats it alike.
SCALE = 10.0
_PRIME = 2_147_483_647  # 2^31 - 1: keeps the mixing product inside int64
_MIX = 1_000_000_007


class NgramEmbedding(nn.Module):
    def __init__(self, vocab_size: int, buckets: int, dim: int, d_out: int, orders: int = 3):
        super().__init__()
        self.base, self.buckets, self.max_order = vocab_size + 1, buckets, orders
        self.table = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, d_out, bias=False)

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        nn.init.normal_(self.table.weight, std=0.02 / SCALE, generator=generator)
        nn.init.zeros_(self.proj.weight)

    def bucket_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, orders) table rows."""
        x = tokens.long() + 1  # 0 marks "before the start"
        T = x.shape[1]
        h = torch.zeros_like(x)
        rows = []
        for n in range(1, self.max_order + 1):
            previous = torch.nn.functional.pad(x, (n - 1, 0))[:, :T]  # x_{t-n+1}, 0 before the start
            h = h * self.base + previous  # < base^orders: inside int64 for any vocabulary up to 2^20
            rows.append(((h % _PRIME) * _MIX + n) % self.buckets)
        return torch.stack(rows, dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(self.bucket_ids(tokens)).sum(2) * SCALE)  # (B, T, d_out)
