"""ZeRO-1/2's communication schedule: where parameters sit in the flat buffer, and when each
bucket's reduce-scatter is launched (during backward, as DDP's reducer does).

Buckets. Data-parallel rank r owns the shard [r*S, (r+1)*S) of a flat buffer. Bucket k is one
piece of every shard: [k*B, (k+1)*B) of the even shards and the mirror image, [S - (k+1)*B,
S - k*B), of the odd ones (`piece`), so one reduce-scatter lands exactly in each owner's piece.
A bucket can be reduced as soon as the gradients of every parameter overlapping any of its N
pieces are final, so the packing decides how early that is.

Packing (`readiness_packing`). Gradients become final roughly in reverse registration order
(the output layer first, the embedding last; DDP assumes the same). The shards are taken in
pairs (0 and 1, 2 and 3, ...; a last odd one alone), each pair a "V": the even shard filled
from its start, the odd one from its end, so both meet in the middle of the pair with their
latest gradients. The parameters, in readiness order, are dealt to the least-filled side of
any pair they fit in; so offset j of every shard becomes final at about the same point of
the backward, bucket 0 after about 1/K of it, bucket 1 after 2/K, ... (K buckets), and a large
late parameter (a tied embedding) straddles the middle of a pair, where both sides are late
anyway, instead of pushing a shard boundary. Shard boundaries still cut through parameters
where they fall; only the order changes. (With dp > 2 a parameter larger than a pair's free
room goes to the last pair and delays the shards after it: the overlap is best at dp 2.)

Launch order. Buckets are launched strictly in index order (k = 0, 1, ...; interleaved over
dtype groups), never out of order, so every rank issues the same collectives in the same
order whatever the order its hooks fire in; a bucket that is not ready (a parameter without
a gradient) holds back the later ones until `ZeroOptimizer.reduce_gradients`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def readiness_packing(sizes: list[int], n: int) -> list[int]:
    """Offsets in the flat buffer of parameters listed in the order their gradients become
    final, for n shards of S = ceil(P / n) elements (see the module docstring)."""
    shard = math.ceil(sum(sizes) / n)
    pairs = (n + 1) // 2
    room = [2 * shard if 2 * v + 1 < n else shard for v in range(pairs)]  # a last odd shard is alone
    sides: list[list[list[int]]] = [[[], []] for _ in range(pairs)]
    fill = [[0, 0] for _ in range(pairs)]
    for i, size in enumerate(sizes):
        totals = [sum(f) for f in fill]

        def fits(v: int) -> bool:  # every later pair still starts at or before its first shard
            return v == pairs - 1 or all(sum(totals[: q + 1]) + size <= sum(room[: q + 1]) for q in range(v, pairs - 1))

        choices = [(v, side) for v in range(pairs) for side in (0, 1) if fits(v) and (side == 0 or 2 * v + 1 < n)]
        v, side = min(choices, key=lambda c: (fill[c[0]][c[1]], c))
        sides[v][side].append(i)
        fill[v][side] += size
    offsets = [0] * len(sizes)
    start = 0
    for v in range(pairs):
        end = start + sum(fill[v])
        position = start
        for i in sides[v][0]:  # the even shard, from the pair's start
            offsets[i] = position
            position += sizes[i]
        position = end
        for i in sides[v][1]:  # the odd shard, from the pair's end backwards
            position -= sizes[i]
            offsets[i] = position
        start = end
    return offsets


def piece(r: int, lo: int, hi: int, shard_size: int) -> tuple[int, int]:
    """Shard r's piece (shard coordinates) of the bucket [lo, hi): mirrored in odd shards."""
    return (shard_size - hi, shard_size - lo) if r % 2 else (lo, hi)


def bucket_ranges(shard_size: int, per_rank: int) -> list[tuple[int, int]]:
    """[lo, hi) of each bucket in shard coordinates."""
    return [(lo, min(shard_size, lo + per_rank)) for lo in range(0, shard_size, per_rank)]


def buckets_of(offset: int, numel: int, shard_size: int, per_rank: int, n: int) -> list[int]:
    """The buckets whose pieces overlap flat [offset, offset + numel)."""
    found: set[int] = set()
    for r in range(n):
        a, b = max(offset, r * shard_size), min(offset + numel, (r + 1) * shard_size)
        if a < b:
            a, b = piece(r, a - r * shard_size, b - r * shard_size, shard_size)
            found.update(range(a // per_rank, (b - 1) // per_rank + 1))
    return sorted(found)


@dataclass
class InFlight:
    """A launched collective and what to do once it completes."""

    work: Any
    finish: Callable[[], None]
    keep: list[torch.Tensor] = field(default_factory=list)  # buffers the collective still uses

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.finish()


class BucketSchedule:
    """Which buckets are ready and launched during one backward (see the module docstring).

    order: every (group, bucket) in launch order; needs[(g, k)]: how many parameters must be
    final before bucket k of group g can go; buckets[id(param)]: the (g, k) it overlaps."""

    def __init__(self, order: list[tuple[int, int]], members: dict[tuple[int, int], list[int]]):
        self.order = order
        self.members = members  # (g, k) -> ids of the parameters overlapping it
        self.buckets: dict[int, list[tuple[int, int]]] = {}
        for key, ids in members.items():
            for pid in ids:
                self.buckets.setdefault(pid, []).append(key)
        self.reset()

    def reset(self) -> None:
        self.remaining = {key: len(ids) for key, ids in self.members.items()}
        self.next = 0  # index into order of the next bucket to launch
        self.final: set[int] = set()
        self.unreduced = {pid: len(keys) for pid, keys in self.buckets.items()}  # buckets not yet launched

    def launched(self, key: tuple[int, int]) -> list[int]:
        """Bucket `key` was launched: the parameters none of whose buckets is left to launch."""
        done = []
        for pid in self.members[key]:
            self.unreduced[pid] -= 1
            if self.unreduced[pid] == 0:
                done.append(pid)
        return done

    def mark_final(self, pid: int) -> list[tuple[int, int]]:
        """A parameter's gradient is final: the buckets that may now be launched, in order."""
        if pid in self.final:
            raise RuntimeError(
                "a parameter received a second gradient after it was marked final in this backward; "
                "under ZeroOptimizer.overlap_backward() each parameter may be used in one backward pass only"
            )
        self.final.add(pid)
        for key in self.buckets.get(pid, []):
            self.remaining[key] -= 1
        ready = []
        while self.next < len(self.order) and self.remaining[self.order[self.next]] == 0:
            ready.append(self.order[self.next])
            self.next += 1
        return ready

    def unlaunched(self) -> list[tuple[int, int]]:
        rest = self.order[self.next :]
        self.next = len(self.order)
        return rest
