"""ZeRO-1/2's flat storage (zero.py): one dtype's trainable parameters packed into one padded
buffer that every parameter becomes a view of, the gradient storage of either stage, and the
owned shard's AdamW state.

    flat_param   N * S elements; parameter p is flat_param[offset : offset + numel].view_as(p),
                 so all-gathering the buffer updates the model in place
    flat_grad    stage 1: N * S elements, p.grad are views into it (None at stage 2)
    shard_grad   the owned shard's averaged gradient, S elements (a view of flat_grad at stage 1)
    exp_avg, exp_avg_sq   AdamW's state of the owned shard, S float32 elements each

S = ceil(P / N); data-parallel rank r owns [r * S, (r + 1) * S), which may cut through a
parameter. The offsets come from zero_buckets.readiness_packing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meshlm.parallel.zero_buckets import piece


@dataclass
class Segment:
    name: str
    param: nn.Parameter
    offset: int  # in the flat buffer
    numel: int
    decay: bool
    weight: float  # grad_weight(name)


class FlatGroup:
    """One dtype's flat parameter buffer, its gradient storage and the owned shard's state."""

    def __init__(self, dtype: torch.dtype, segments: list[Segment], n: int, rank: int, stage: int):
        self.dtype, self.segments, self.n, self.rank = dtype, segments, n, rank
        self.numel = sum(s.numel for s in segments)
        self.shard_size = math.ceil(self.numel / n)
        self.lo = rank * self.shard_size  # owned range in the flat buffer
        self.hi = self.lo + self.shard_size
        self._starts = [s.offset for s in segments]
        device = segments[0].param.device
        padded = n * self.shard_size
        self.flat_param = torch.zeros(padded, dtype=dtype, device=device)
        with torch.no_grad():
            for s in segments:
                view = self.flat_param[s.offset : s.offset + s.numel].view_as(s.param)
                view.copy_(s.param)
                s.param.data = view
        self.shard_param = self.flat_param[self.lo : self.hi]
        if stage == 1:
            self.flat_grad = torch.zeros(padded, dtype=dtype, device=device)
            self.shard_grad = self.flat_grad[self.lo : self.hi]
            self.point_grads_at_flat()
        else:
            self.flat_grad = None
            self.shard_grad = torch.zeros(self.shard_size, dtype=dtype, device=device)
        self.exp_avg = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        self.decay_runs = self._runs(lambda s: s.decay, keep=True)
        self.weight_runs = self._runs(lambda s: s.weight)

    def _runs(self, key: Callable[[Segment], Any], keep: Any = None) -> list[tuple[int, int, Any]]:
        """Maximal runs (lo, hi, value) of the owned shard, in shard coordinates, over which
        key(segment) is constant; with `keep`, only runs whose value equals it."""
        runs: list[tuple[int, int, Any]] = []
        for s in self.segments:
            a, b = max(s.offset, self.lo), min(s.offset + s.numel, self.hi)
            if a >= b:
                continue
            value = key(s)
            if runs and runs[-1][1] == a - self.lo and runs[-1][2] == value:
                runs[-1] = (runs[-1][0], b - self.lo, value)
            else:
                runs.append((a - self.lo, b - self.lo, value))
        return [r for r in runs if keep is None or r[2] == keep]

    def grad_view(self, s: Segment) -> torch.Tensor:
        return self.flat_grad[s.offset : s.offset + s.numel].view_as(s.param)

    def point_grads_at_flat(self) -> None:
        for s in self.segments:
            s.param.grad = self.grad_view(s)

    def gather_local_grads(self) -> None:
        """Stage 1: make sure every p.grad lives in the flat buffer (a caller may have set
        p.grad to None or autograd may have replaced it); copy in what does not."""
        for s in self.segments:
            view, g = self.grad_view(s), s.param.grad
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            s.param.grad = view

    def fill_rows(self, staging: torch.Tensor, lo: int, hi: int) -> None:
        """Stage 2: staging[r] = this rank's local gradient over shard r's piece of bucket
        [lo, hi) (zero_buckets.piece)."""
        staging.zero_()
        for r in range(self.n):
            a, b = (r * self.shard_size + x for x in piece(r, lo, hi, self.shard_size))
            i = max(0, bisect.bisect_right(self._starts, a) - 1)
            while i < len(self.segments) and self.segments[i].offset < b:
                s = self.segments[i]
                x, y = max(a, s.offset), min(b, s.offset + s.numel)
                if x < y and s.param.grad is not None:
                    staging[r, x - a : y - a].copy_(s.param.grad.reshape(-1)[x - s.offset : y - s.offset])
                i += 1
