"""ZeRO-1 / ZeRO-2: AdamW whose state (and, at stage 2, gradients) is sharded evenly over dp.

Why by hand: torch's ZeroRedundancyOptimizer partitions whole parameters (so a rank's
share is not 1/N), and FSDP2 is ZeRO-3 (parameters sharded at rest). Here the shares
are exact, so the per-rank bytes match the ZeRO paper's formulas.

Layout (zero_flat.py). The trainable parameters (shared/tied ones once, under their first
name) are packed, per dtype, into one flat buffer padded to N * S elements, S = ceil(P / N),
N = dp size; every parameter becomes a view into it. Data-parallel rank r owns the shard
[r*S, (r+1)*S). Stage 1 keeps N*S gradient elements (p.grad are views into one flat buffer),
stage 2 only the owned S (p.grad is freed after reduce_gradients); both keep 2*S float32 of
optimizer state (exp_avg, exp_avg_sq).

Per step (the caller drives it):
    for each micro-batch but the last: loss.backward()   # accumulates p.grad locally
    with opt.overlap_backward(): loss.backward()         # the last one: buckets are reduce-
                                                         # scattered as their gradients are final
    opt.reduce_gradients()                     # waits for them (and reduces the rest), sum / N
    sq = opt.grad_sq_sum(); all_reduce(sq)     # the global norm for clipping
    opt.step(lr, clip_coef)                    # AdamW on the owned shard, all-gathered bucket by
                                               # bucket while the next bucket is updated
    opt.zero_grad()
Without `overlap_backward`, reduce_gradients does all the reduce-scatters after the backward
(the same sums, bit for bit: the same collectives on the same buckets, only launched earlier).

The AdamW arithmetic is torch.optim.AdamW's (decoupled decay, lerp for exp_avg, the same
bias corrections and op order), run on the flat shard; decay applies only to elements of
parameters with dim >= 2 (meshlm.train.optim.param_groups). Differences from torch's
AdamW: a trainable parameter that got no gradient is treated as a zero gradient (torch
skips it), and non-float32 parameters are updated in float32 and rounded back (no
float32 master copy; meshlm trains with float32 parameters under autocast).

Collectives: gloo on CPU supports reduce-scatter natively in torch 2.13
(`reduce_scatter_single`, formerly `reduce_scatter_tensor`), so no all-reduce emulation.
Buckets: rank r's piece of bucket k is [r*S + k*B, r*S + (k+1)*B), so one reduce-scatter
per bucket lands exactly in the owned shard; at most two buckets are in flight outside the
backward (one communicating while the next is filled or updated), so the transient staging
is <= 2 x bucket_bytes. The parameters are packed in the order their gradients become final,
and buckets are launched in index order on every rank (zero_buckets.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meshlm.config import TrainConfig
from meshlm.distributed.collectives import all_gather_single as _all_gather
from meshlm.distributed.collectives import reduce_scatter_single as _reduce_scatter
from meshlm.parallel.zero_buckets import BucketSchedule, InFlight, bucket_ranges, buckets_of, piece, readiness_packing
from meshlm.parallel.zero_flat import FlatGroup, Segment
from meshlm.parallel.zero_state import normalise_layout

EPS = 1e-8


class ZeroOptimizer:
    """Sharded AdamW (ZeRO stage 1 or 2) over `dp_group`. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        dp_group: dist.ProcessGroup,
        stage: int,
        cfg: TrainConfig,
        grad_weight: Callable[[str], float] = lambda name: 1.0,
        *,
        bucket_bytes: int = 25 * 2**20,
    ):
        if stage not in (1, 2):
            raise ValueError(
                f"ZeroOptimizer implements ZeRO stage 1 or 2, got stage={stage} "
                f"(stage 0 is DDP, stage 3 is FSDP's fully_shard)."
            )
        self.group, self.stage, self.cfg = dp_group, stage, cfg
        self.n, self.rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
        self.bucket_bytes = bucket_bytes
        self.step_count = 0
        self._reduced = False
        by_dtype: dict[torch.dtype, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if type(p.data) is not torch.Tensor:  # DTensor (tensor parallel) and other subclasses
                raise TypeError(
                    f"ZeroOptimizer needs plain tensors, but parameter '{name}' is a "
                    f"{type(p.data).__name__}; pass the local shard module or use FSDP."
                )
            by_dtype.setdefault(p.dtype, []).append((name, p))
        if not by_dtype:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters.")
        self.groups = []
        for dt, named in by_dtype.items():
            named = named[::-1]  # the order gradients become final in (zero_buckets.readiness_packing)
            offsets = readiness_packing([p.numel() for _, p in named], self.n)
            segments = [
                Segment(name, p, off, p.numel(), p.dim() >= 2, float(grad_weight(name)))
                for (name, p), off in zip(named, offsets)
            ]
            self.groups.append(FlatGroup(dt, sorted(segments, key=lambda s: s.offset), self.n, self.rank, stage))
        self._in_flight: list[InFlight] = []
        self._armed = False
        self.schedule = self._bucket_schedule()
        self._segment_of = {id(s.param): (g, s) for g in self.groups for s in g.segments}
        for g in self.groups:
            for s in g.segments:
                s.param.register_post_accumulate_grad_hook(self._on_gradient_final)

    def _bucket_schedule(self) -> BucketSchedule:
        members: dict[tuple[int, int], list[int]] = {}
        for gi, g in enumerate(self.groups):
            B = self._bucket_elems(g)
            for k in range(len(bucket_ranges(g.shard_size, B))):
                members[(gi, k)] = []
            for s in g.segments:
                for k in buckets_of(s.offset, s.numel, g.shard_size, B, self.n):
                    members[(gi, k)].append(id(s.param))
        order = sorted(members, key=lambda key: (key[1], key[0]))
        return BucketSchedule(order, members)

    # ------------------------------------------------------------------ gradients

    def _bucket_elems(self, group: FlatGroup) -> int:
        """Elements per rank in one bucket (one collective moves N times this)."""
        per_rank = self.bucket_bytes // (self.n * group.flat_param.element_size())
        return max(1, min(group.shard_size, per_rank))

    @contextlib.contextmanager
    def overlap_backward(self) -> Iterator[None]:
        """Run the step's last backward inside this: each bucket's reduce-scatter is launched
        (asynchronously) as soon as the gradients of every parameter in it are final, while
        the backward goes on; reduce_gradients() then waits for them. Earlier micro-batches'
        backwards stay outside (they only accumulate)."""
        if self._reduced:
            raise RuntimeError("overlap_backward() after reduce_gradients(); call step() and zero_grad() first.")
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @torch.no_grad()
    def _on_gradient_final(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        g, s = self._segment_of[id(param)]
        if self.stage == 1:  # the bucket reads the flat buffer: the gradient must be in it
            view = g.grad_view(s)
            if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                view.copy_(param.grad)
                param.grad = view
        for key in self.schedule.mark_final(id(param)):
            self._launch_reduce(*key, limit=None)

    @torch.no_grad()
    def _launch_reduce(self, gi: int, k: int, limit: int | None) -> None:
        """Reduce-scatter bucket k of group gi asynchronously (waiting for the oldest bucket
        in flight first when `limit` buckets already are)."""
        g, n, S = self.groups[gi], self.n, self.groups[gi].shard_size
        lo, hi = bucket_ranges(S, self._bucket_elems(g))[k]
        b = hi - lo
        if self.stage == 1 and b == S:  # a single bucket: the flat buffer itself
            inp = g.flat_grad.view(n, S)
        elif self.stage == 1:
            inp = torch.stack([g.flat_grad[r * S + a : r * S + z] for r in range(n) for a, z in [piece(r, lo, hi, S)]])
        else:
            inp = torch.empty(n, b, dtype=g.dtype, device=g.flat_param.device)
            g.fill_rows(inp, lo, hi)
        for pid in self.schedule.launched((gi, k)):
            if self.stage == 2:  # copied into the buckets that need it: free the full gradient now
                self._segment_of[pid][1].param.grad = None
        out = torch.empty(b, dtype=g.dtype, device=g.flat_param.device)
        work = _reduce_scatter(out, inp.view(-1), group=self.group, async_op=True) if n > 1 else None
        if n == 1:
            out.copy_(inp.view(-1))

        mine = slice(*piece(self.rank, lo, hi, S))

        def finish() -> None:  # sum, then divide by N: the average DDP produces
            torch.div(out, n, out=g.shard_grad[mine])

        self._track(InFlight(work, finish, [inp, out]), limit)

    def _track(self, item: InFlight, limit: int | None) -> None:
        self._in_flight.append(item)
        while limit is not None and len(self._in_flight) > limit:
            self._in_flight.pop(0).wait()

    def _drain(self) -> None:
        while self._in_flight:
            self._in_flight.pop(0).wait()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the accumulated local gradients over dp into each rank's shard (sum / N).
        Call once per optimizer step, after the last micro-batch's backward. Afterwards the
        owned shard holds the averaged gradient; at stage 1 the rest of the flat gradient
        buffer still holds this rank's local (unreduced) gradients, at stage 2 p.grad is None."""
        if self._reduced:
            raise RuntimeError(
                "reduce_gradients() was already called for this step; call step() and zero_grad() first."
            )
        if self.stage == 1:
            for g in self.groups:  # buckets launched in backward already hold their gradients
                g.gather_local_grads()
        for key in self.schedule.unlaunched():
            self._launch_reduce(*key, limit=2)
        self._drain()
        if self.stage == 2:
            for g in self.groups:
                for s in g.segments:
                    s.param.grad = None
        self._reduced = True

    @torch.no_grad()
    def grad_sq_sum(self) -> torch.Tensor:
        """Sum over this rank's shard of grad^2 * grad_weight(name), a float32 scalar. Summed
        over the dp group (and, with weights 1/tp for replicated params, over the world) it is
        the squared norm of the full averaged gradient. Call after reduce_gradients()."""
        if not self._reduced:
            raise RuntimeError("grad_sq_sum() needs reduce_gradients() first.")
        total = torch.zeros((), dtype=torch.float32, device=self.groups[0].flat_param.device)
        for g in self.groups:
            grad = g.shard_grad.float()
            for lo, hi, w in g.weight_runs:
                part = grad[lo:hi]
                total += torch.dot(part, part) * w
        return total

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def step(self, lr: float, clip_coef: float | torch.Tensor = 1.0) -> None:
        """grads *= clip_coef, AdamW on the owned shard, then all-gather the parameters. Bucket
        by bucket, from the last to the first (the first blocks' parameters sit in the last
        buckets: the next forward needs them first): each bucket's all-gather runs while the
        next one is updated."""
        if not self._reduced:
            raise RuntimeError("step() needs reduce_gradients() after the backward passes.")
        self.step_count += 1
        for g in self.groups:
            g.shard_grad.mul_(clip_coef)
            for lo, hi in reversed(bucket_ranges(g.shard_size, self._bucket_elems(g))):
                self._adamw(g, *piece(self.rank, lo, hi, g.shard_size), lr)
                self._launch_gather(g, lo, hi)
        self._drain()

    def _adamw(self, g: FlatGroup, lo: int, hi: int, lr: float) -> None:
        """AdamW on shard elements [lo, hi) (elementwise: the same bits as on the whole shard)."""
        c = self.cfg
        beta1, beta2, wd = c.beta1, c.beta2, c.weight_decay
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2 = 1 - beta2**self.step_count
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        grad = g.shard_grad[lo:hi].float()
        shard = g.shard_param[lo:hi]
        param = shard if g.dtype == torch.float32 else shard.float()
        exp_avg, exp_avg_sq = g.exp_avg[lo:hi], g.exp_avg_sq[lo:hi]
        if wd != 0:
            for a, b, _ in g.decay_runs:
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    param[a - lo : b - lo].mul_(1 - lr * wd)
        # torch.optim.adam._single_tensor_adam / _multi_tensor_adam, same op order.
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if param is not shard:
            shard.copy_(param)

    def _launch_gather(self, g: FlatGroup, lo: int, hi: int) -> None:
        if self.n == 1:
            return
        n, S = self.n, g.shard_size
        out = torch.empty(n, hi - lo, dtype=g.dtype, device=g.flat_param.device)
        mine = g.shard_param[slice(*piece(self.rank, lo, hi, S))].clone()  # must not alias the rows it lands in
        work = _all_gather(out.view(-1), mine, group=self.group, async_op=True)

        def finish() -> None:
            for r in range(n):
                a, z = piece(r, lo, hi, S)
                g.flat_param[r * S + a : r * S + z].copy_(out[r])

        self._track(InFlight(work, finish, [out, mine]), limit=2)

    @torch.no_grad()
    def zero_grad(self) -> None:
        self.schedule.reset()
        for g in self.groups:
            if self.stage == 1:
                g.flat_grad.zero_()
                g.point_grads_at_flat()
            else:
                g.shard_grad.zero_()
                for s in g.segments:
                    s.param.grad = None
        self._reduced = False

    # ------------------------------------------------------------------ accounting and state

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds at rest, measured from the storages it keeps (padding included):
        params N*S*e, grads N*S*e (stage 1) or S*e (stage 2), optimizer 2*S*4, summed over
        dtype groups (e = element size, S = ceil(P/N))."""

        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.untyped_storage().nbytes()

        out = {"params": 0, "grads": 0, "optimizer": 0}
        for g in self.groups:
            out["params"] += nbytes(g.flat_param)
            out["grads"] += nbytes(g.flat_grad) if self.stage == 1 else nbytes(g.shard_grad)
            out["optimizer"] += nbytes(g.exp_avg) + nbytes(g.exp_avg_sq)
            if self.stage == 2:  # full gradients left behind would be counted, not hidden
                out["grads"] += sum(nbytes(s.param.grad) for s in g.segments)
        return out

    def _layout(self, g: FlatGroup) -> dict[str, Any]:
        return {
            "dtype": str(g.dtype).removeprefix("torch."),
            "numel": g.numel,
            "shard_size": g.shard_size,
            "shard_range": (g.lo, g.hi),
            "params": [
                {"name": s.name, "shape": tuple(s.param.shape), "offset": s.offset, "numel": s.numel, "decay": s.decay}
                for s in g.segments
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer state, with the layout (names, shapes, offsets,
        shard range) that `consolidate_state_dicts` needs to rebuild per-parameter tensors."""
        return {
            "stage": self.stage,
            "dp_size": self.n,
            "dp_rank": self.rank,
            "step": self.step_count,
            "groups": [
                {**self._layout(g), "exp_avg": g.exp_avg.clone(), "exp_avg_sq": g.exp_avg_sq.clone()}
                for g in self.groups
            ],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state_dict saved by the same rank of the same layout (same model, dp size).
        For a different dp size, consolidate the old shards and use load_full_state."""
        if (sd["dp_size"], sd["dp_rank"]) != (self.n, self.rank):
            raise ValueError(
                f"optimizer shard was saved by dp rank {sd['dp_rank']} of {sd['dp_size']}, "
                f"this is rank {self.rank} of {self.n}; consolidate_state_dicts + load_full_state reshards."
            )
        if len(sd["groups"]) != len(self.groups):
            raise ValueError(f"saved state has {len(sd['groups'])} dtype groups, this optimizer {len(self.groups)}.")
        for g, saved in zip(self.groups, sd["groups"]):
            mine = self._layout(g)
            for key in ("dtype", "numel", "shard_size", "params"):
                if normalise_layout(saved[key]) != normalise_layout(mine[key]):
                    raise ValueError(
                        f"saved optimizer layout differs from this model's in '{key}' "
                        f"(dtype group {mine['dtype']}); was the model changed?"
                    )
        for g, saved in zip(self.groups, sd["groups"]):
            g.exp_avg.copy_(saved["exp_avg"])
            g.exp_avg_sq.copy_(saved["exp_avg_sq"])
        self.step_count = int(sd["step"])

    def load_full_state(self, full: dict[str, Any]) -> None:
        """Take this rank's shard from consolidated per-parameter state (any former dp size)."""
        for g in self.groups:
            for key, dest in (("exp_avg", g.exp_avg), ("exp_avg_sq", g.exp_avg_sq)):
                flat = torch.zeros(g.n * g.shard_size, dtype=torch.float32)
                for s in g.segments:
                    flat[s.offset : s.offset + s.numel] = full["params"][s.name][key].reshape(-1)
                dest.copy_(flat[g.lo : g.hi])
        self.step_count = int(full["step"])
