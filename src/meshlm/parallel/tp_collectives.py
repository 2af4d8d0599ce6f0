"""Megatron's f and g: the autograd functions at the edges of a tensor-parallel region.

A tensor-parallel region is the stretch of a layer where each rank holds a slice of the
hidden features (its own heads, its own MLP columns). The region is entered through a
column-parallel linear and left through a row-parallel linear:

    X ──f──> [ X A_i  ->  act  ->  (.) B_i ] ──g──> Y = sum_i (.) B_i
             (column-parallel)  (row-parallel)

Megatron-LM (Shoeybi et al. 2019, fig. 3) names the two conjugate operators f and g:
f is the identity going forward and an all-reduce going backward; g is an all-reduce
going forward and the identity going backward. With sequence parallelism (Korthikanti
et al. 2022) activations outside the region are split along the sequence, and the
pair becomes an all-gather (f) and a reduce-scatter (g), each the other's transpose.

Every activation collective of the tensor-parallel layers goes through this file, one
call per autograd function and direction, so the communication volume can be read off
the code (the loss's two all-reduces are in `vocab_parallel`; the closed forms are in
`tensor_parallel`'s docstring and, as data, in `tp_communication` at the end here).

Shapes are (B, T, d) with the sequence on dim 1. torch's single-tensor collectives
gather and scatter along dim 0, so the sequence functions move the rank axis in
front (one copy each way; free when B == 1). gloo on CPU supports both
`all_gather_single` (formerly `all_gather_into_tensor`) and `reduce_scatter_single`
(formerly `reduce_scatter_tensor`) in the torch versions we use; older versions fall
back to the deprecated names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from meshlm.distributed.collectives import all_gather_single as _all_gather_single
from meshlm.distributed.collectives import reduce_scatter_single as _reduce_scatter_single


def _check_seq_divisible(T: int, tp: int) -> None:
    if T % tp:
        raise ValueError(
            f"sequence parallelism splits the sequence over the tp ranks: the sequence length {T} "
            f"is not divisible by tp ({tp})."
        )


def all_gather_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, T/tp, ...) on every rank -> (B, T, ...), rank r's chunk at positions [r*T/tp, (r+1)*T/tp).
    One all-gather: each rank contributes x.numel() elements and receives tp * x.numel()."""
    tp = dist.get_world_size(group)
    if tp == 1:
        return x
    B, t = x.shape[0], x.shape[1]
    out = x.new_empty((tp * B, *x.shape[1:]))  # ranks concatenated along dim 0
    _all_gather_single(out, x.contiguous(), group=group)
    return out.view(tp, B, *x.shape[1:]).movedim(0, 1).reshape(B, tp * t, *x.shape[2:])


def reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, T, ...) partial sums on every rank -> this rank's (B, T/tp, ...) chunk of the sum.
    One reduce-scatter: each rank contributes x.numel() elements and receives x.numel() / tp."""
    tp = dist.get_world_size(group)
    if tp == 1:
        return x
    B, T = x.shape[0], x.shape[1]
    _check_seq_divisible(T, tp)
    chunks = x.reshape(B, tp, T // tp, *x.shape[2:]).movedim(1, 0).contiguous()  # (tp, B, T/tp, ...)
    out = x.new_empty((B, T // tp, *x.shape[2:]))
    _reduce_scatter_single(out, chunks.view(tp * B, T // tp, *x.shape[2:]), group=group)
    return out


def split_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """This rank's chunk along the sequence (dim 1); no communication."""
    tp = dist.get_world_size(group)
    if tp == 1:
        return x
    _check_seq_divisible(x.shape[1], tp)
    return x.chunk(tp, dim=1)[dist.get_rank(group)].contiguous()


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Megatron's f, the entrance of a tensor-parallel region without sequence parallelism.

    Forward: identity. Every rank already holds the full input X and multiplies it by its
    own columns A_i. Backward: all-reduce. dL/dX = sum_i dL/d(X A_i) A_i^T, and each rank
    only has its own term of that sum, so the terms are added across the tp group.
    Traffic: backward, one all-reduce of X.numel() elements."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Reduce a copy: the engine may hand the caller's own tensor here (e.g. y.backward(g)).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Megatron's g, the exit of a tensor-parallel region without sequence parallelism.

    Forward: all-reduce. Each rank's row-parallel product (.)_i B_i is a partial sum of
    Y; adding them across the group gives the full Y on every rank. Backward: identity,
    since dL/d(partial_i) = dL/dY for every i and every rank already holds dL/dY.
    Traffic: forward, one all-reduce of Y.numel() elements."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        if x.grad_fn is not None and x._base is None and x.is_contiguous():
            # A fresh intermediate (the row-parallel matmul's output): reduce it in place.
            # Should anything have saved it for backward, autograd's version check says so.
            ctx.mark_dirty(x)
        else:  # leaves, views, non-contiguous tensors: reduce a copy
            x = x.contiguous() if not x.is_contiguous() else x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """f under sequence parallelism: enter the region from sequence-sharded activations.

    Forward: all-gather along the sequence, (B, T/tp, d) -> (B, T, d), since the
    column-parallel projection needs every position. Backward: reduce-scatter. The
    gradient of the gathered X is a partial sum on each rank (its columns' term, as for
    f above), and each rank only needs its own positions of the sum.
    Traffic: forward one all-gather, backward one reduce-scatter, of B*T*d elements
    (B*T*d/tp per rank in, respectively out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_seq(grad, ctx.group), None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """g under sequence parallelism: leave the region into sequence-sharded activations.

    Forward: reduce-scatter along the sequence, (B, T, d) partial sums -> (B, T/tp, d) of
    the full sum. Backward: all-gather, since every rank's partial product contributed
    to every position, so each needs the gradient of all of them.
    Traffic: forward one reduce-scatter, backward one all-gather, of B*T*d elements."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_seq(grad.contiguous(), ctx.group), None


class ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Enter the sequence-sharded layout from a tensor every rank holds in full.

    Forward: keep this rank's sequence chunk (no communication). Backward: all-gather,
    because the full input's gradient is made of every rank's chunk gradient. Used for
    replicated inputs (e.g. a stage input that arrives unsharded); the model's own path
    never needs it. Traffic: backward one all-gather of B*T*d elements."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return split_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_seq(grad.contiguous(), ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return ReduceScatterToSequenceParallelRegion.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return ScatterToSequenceParallelRegion.apply(x, group)


def enter_tp_region(x: torch.Tensor, group: ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    """f: all-gather (sequence parallel) or copy."""
    return gather_from_sequence_region(x, group) if sequence_parallel else copy_to_tp_region(x, group)


def exit_tp_region(x: torch.Tensor, group: ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    """g: reduce-scatter (sequence parallel) or all-reduce."""
    return reduce_scatter_to_sequence_region(x, group) if sequence_parallel else reduce_from_tp_region(x, group)


# ----------------------------------------------------------------------------- accounting
# The closed forms of tensor_parallel's module docstring, as data.


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a micro-batch. `numel`: all-reduce operand, all-gather
    output, reduce-scatter input (the full tensor); `dtype`: "activation" or "float32"."""

    op: str  # "all_reduce" | "all_reduce_max" | "all_gather" | "reduce_scatter"
    phase: str  # "forward" | "backward"
    where: str
    calls: int
    numel: int
    dtype: str = "activation"

    def bytes_per_rank(self, tp: int, itemsize: int) -> float:
        """Bytes each rank sends for all `calls`, with ring algorithms."""
        factor = 2 * (tp - 1) / tp if self.op.startswith("all_reduce") else (tp - 1) / tp
        return self.calls * factor * self.numel * itemsize


def tp_communication(
    B: int,
    T: int,
    d: int,
    n_layers: int,
    tp: int,
    sequence_parallel: bool,
    has_embedding: bool = True,
    has_output: bool = True,
    with_loss: bool = True,
) -> list[Collective]:
    """The tensor-parallel collectives of one micro-batch (forward + backward) on a stage
    with `n_layers` blocks: the table in meshlm.parallel.tensor_parallel's docstring."""
    N, L, out = B * T * d, n_layers, []
    if sequence_parallel:
        if L:
            out += [
                Collective("all_gather", "forward", "block f", 2 * L, N),
                Collective("reduce_scatter", "forward", "block g", 2 * L, N),
                Collective("reduce_scatter", "backward", "block f", 2 * L, N),
                Collective("all_gather", "backward", "block g", 2 * L, N),
            ]
        if has_embedding:
            out += [
                Collective("reduce_scatter", "forward", "vocab embedding", 1, N),
                Collective("all_gather", "backward", "vocab embedding", 1, N),
            ]
        if has_output:
            out += [
                Collective("all_gather", "forward", "output", 1, N),
                Collective("reduce_scatter", "backward", "output", 1, N),
            ]
    else:
        if L:
            out += [
                Collective("all_reduce", "forward", "block g", 2 * L, N),
                Collective("all_reduce", "backward", "block f", 2 * L, N),
            ]
        if has_embedding:
            out.append(Collective("all_reduce", "forward", "vocab embedding", 1, N))
        if has_output:
            out.append(Collective("all_reduce", "backward", "output", 1, N))
    if has_output and with_loss:
        out += [
            Collective("all_reduce_max", "forward", "loss max", 1, B * T, "float32"),
            Collective("all_reduce", "forward", "loss sum-exp + target", 1, 2 * B * T, "float32"),
        ]
    return out
