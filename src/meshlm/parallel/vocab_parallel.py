"""The vocabulary split over the tensor-parallel ranks: embedding, output layer, loss.

The vocabulary V is padded up to V_pad = ceil(V / tp) * tp rows so every rank holds the
same number of rows, V_pad / tp; rank r owns token ids [r * V_pad/tp, (r+1) * V_pad/tp).
The padded rows (ids >= V) are zero, are never looked up (no token has such an id), and
their logits are excluded from the loss, so they never receive a gradient.

- `VocabParallelEmbedding`: each rank looks up the ids it owns and writes zeros for the
  others; summing over ranks (all-reduce, or reduce-scatter along the sequence under
  sequence parallelism) gives the full embedding.
- the output layer is a column-parallel linear with the same row split; it returns the
  rank's LOCAL logits (B, T, V_pad/tp). Full logits are never gathered in training.
- `vocab_parallel_cross_entropy`: the loss from local logits, Megatron-style: only
  per-token statistics cross the wire, never logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from meshlm.parallel.tp_collectives import enter_tp_region, exit_tp_region


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp."""
    return -(-vocab_size // tp) * tp


def pad_vocab_rows(weight: torch.Tensor, vocab_size: int, tp: int, dim: int = 0) -> torch.Tensor:
    """(V, d) -> (V_pad, d) with zero rows appended (along `dim`: -1 for (R, V) tables)."""
    extra = padded_vocab_size(vocab_size, tp) - weight.shape[dim]
    if extra == 0:
        return weight
    shape = list(weight.shape)
    shape[dim] = extra
    return torch.cat([weight, weight.new_zeros(shape)], dim=dim)


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding rows [vocab_start, vocab_start + V_pad/tp) of the padded table.

    Forward: look up the owned ids, zero the rest, then leave the tensor-parallel region
    (g): an all-reduce of B*T*d elements, or under sequence parallelism a reduce-scatter
    along the sequence that returns this rank's (B, T/tp, d) chunk. Backward: no
    communication (identity), respectively one all-gather of B*T*d elements."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group: ProcessGroup, sequence_parallel: bool):
        super().__init__(weight.shape[0], weight.shape[1], device="meta")
        self.weight = weight
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_start + self.num_embeddings)
        local_ids = (tokens - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local_ids, self.weight)  # (B, T, d), rows of other ranks' ids are wrong ...
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)  # ... and zeroed here
        return exit_tp_region(h, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_start={self.vocab_start}, sequence_parallel={self.sequence_parallel}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits (Megatron-LM's algorithm).

    loss = log(sum_v exp(x_v - m)) - (x_target - m), with m the global max over v.
    Forward, per token (N = number of tokens):
      1. local max over the real (unpadded) columns, all-reduce(MAX): N float32;
      2. sum of exp(x - m) over the local real columns, and x_target - m where the rank
         owns the target (0 elsewhere), stacked into one all-reduce(SUM): 2N float32
         (Megatron issues these as two all-reduces of N; stacking saves one latency).
    Backward: none. d loss / d x_v = softmax_v - [v == target], all local.
    Everything is computed in float32; the gradient is returned in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        n_local = logits.shape[-1]
        n_real = max(0, min(n_local, vocab_size - vocab_start))  # columns that are real tokens
        x = logits.float()
        if n_real > 0:
            logits_max = x[:, :n_real].max(dim=-1).values
        else:  # the whole shard is padding (tiny vocabularies only)
            logits_max = x.new_full(x.shape[:-1], float("-inf"))
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - logits_max.unsqueeze(-1)  # a new float32 tensor: the caller's logits stay untouched

        owned = (targets >= vocab_start) & (targets < vocab_start + n_real)
        local_targets = (targets - vocab_start).masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        exp = shifted.exp_()
        if n_real < n_local:
            exp[:, n_real:] = 0.0  # padded columns are not part of the vocabulary
        stats = torch.stack((exp.sum(dim=-1), target_logit))  # (2, N)
        dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]

        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, owned, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The softmax is reused in place: a second backward through the same graph
        # (retain_graph) fails autograd's version check instead of giving wrong numbers.
        softmax, local_targets, owned, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup,
    vocab_size: int,
    vocab_start: int | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of the full-vocabulary softmax, from this rank's logits (..., V_pad/tp).

    targets: (...) token ids (global), `ignore_index` ones excluded as in F.cross_entropy.
    vocab_size: the real vocabulary; columns at global index >= vocab_size are padding.
    vocab_start: global id of local column 0 (default: tp_rank * V_pad/tp).
    reduction: "mean" (over the non-ignored tokens), "sum" or "none" (per-token, targets' shape).
    The value is identical on every tp rank. Communication: forward one all-reduce(MAX) of
    N and one all-reduce(SUM) of 2N float32 elements (N = targets.numel()); backward none."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n_local = local_logits.shape[-1]
    if vocab_start is None:
        vocab_start = dist.get_rank(tp_group) * n_local
    losses = _VocabParallelCrossEntropy.apply(
        local_logits.reshape(-1, n_local), targets.reshape(-1), tp_group, vocab_start, vocab_size, ignore_index
    )
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()


@torch.no_grad()
def gather_vocab_logits(local_logits: torch.Tensor, tp_group: ProcessGroup, vocab_size: int) -> torch.Tensor:
    """Full logits (..., V) from every rank's (..., V_pad/tp), padding cut. For evaluation,
    sampling and tests only (no gradient): training never materialises full logits.
    One all-gather of the full logits' numel (V_pad * tokens) elements."""
    tp = dist.get_world_size(tp_group)
    parts = [torch.empty_like(local_logits) for _ in range(tp)]
    dist.all_gather(parts, local_logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


class _LogSumExpOverRanks(torch.autograd.Function):
    """log sum_r exp(x_r) of each rank's partial log-sum-exp: forward one all-gather of N
    float32 per rank (then the same reduction, in rank order, on every rank: identical bits);
    backward none: d/dx_r = exp(x_r - result), and every rank holds the full upstream gradient
    (what follows is replicated)."""

    @staticmethod
    def forward(ctx, local, group):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        total = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(local, total)
        return total

    @staticmethod
    def backward(ctx, grad):
        local, total = ctx.saved_tensors
        return grad * (local - total).exp(), None


class TensorParallelVocabOps:
    """The VocabOps of a `vocab_columns` module (meshlm.model.spec) on tensor-parallel rank r,
    which holds vocabulary columns [vocab_start, vocab_start + V_pad/tp): the reductions over
    the vocabulary as collectives over the tp group. Padded columns (ids >= vocab_size) are
    left out of every reduction."""

    def __init__(self, group: ProcessGroup, vocab_start: int, vocab_size: int):
        self.group, self.vocab_start, self.vocab_size = group, vocab_start, vocab_size

    def _n_real(self, n_local: int) -> int:
        return max(0, min(n_local, self.vocab_size - self.vocab_start))

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        n_real = self._n_real(x.shape[-1])
        if n_real > 0:
            local = torch.logsumexp(x[..., :n_real], dim=-1)
        else:  # the whole shard is padding (tiny vocabularies only)
            local = x.new_full(x.shape[:-1], float("-inf"))
        return _LogSumExpOverRanks.apply(local, self.group)

    def select(self, table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each rank looks up the ids it owns (zeros elsewhere); g sums them: forward one
        all-reduce of tokens.numel() x R elements, backward none."""
        n_real = self._n_real(table.shape[-1])
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_start + n_real)
        local_ids = (tokens - self.vocab_start).masked_fill(outside, 0)
        picked = F.embedding(local_ids, table.t()).masked_fill(outside.unsqueeze(-1), 0.0)  # (..., R)
        return exit_tp_region(picked, self.group, False)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return enter_tp_region(x, self.group, False)

    def __repr__(self) -> str:
        return f"TensorParallelVocabOps(vocab_start={self.vocab_start}, vocab_size={self.vocab_size})"
