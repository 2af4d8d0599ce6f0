"""Tensor parallelism (Megatron-LM style, hand-written) with optional sequence parallelism.

Why hand-written: on CPU/gloo, DTensor's `parallelize_module` with the same plan took
~1.7x the step time of these explicit autograd functions issuing the same collectives.

Layout (tp ranks, rank r; names and module tree unchanged, each parameter holds its shard)
------------------------------------------------------------------------------------------
    tok_embeddings.weight    rows (vocab) split, vocab padded to V_pad = ceil(V/tp)*tp  dim 0
    attention.wq/wk/wv       column-parallel: rank r holds heads [r*H/tp, (r+1)*H/tp)    dim 0
                             (and kv heads [r*KV/tp, ...): GQA groups stay on one rank)
    attention.wo             row-parallel (input features = the rank's heads), bias full  dim 1
    feed_forward.w1 (w3)     column-parallel                                             dim 0
    feed_forward.w2          row-parallel, bias full, added once after the reduction     dim 1
    output.weight            column-parallel over the padded vocab (the embedding's
                             shard itself when tied); returns LOCAL logits (B, T, V_pad/tp)
    norms, pos_embeddings, row-parallel biases: replicated

One block, with Megatron's f and g (meshlm.parallel.tp_collectives); `_r` is rank r's shard:

    h ── attention_norm ── f ──┬─ wq_r ─┐
                               ├─ wk_r ─┼─ attention over the rank's heads ─ wo_r ─ g ─ (+ bias) ─ (+ h) ─> h'
                               └─ wv_r ─┘
    h' ─ ffn_norm ──────── f ──┬─ w1_r ─ act ─┐
                               └─ w3_r ───────┴─ (*) ─ w2_r ─ g ─ (+ bias) ─ (+ h') ─> h''

    f = identity forward / all-reduce backward;  g = all-reduce forward / identity backward.
    With sequence parallelism everything outside f..g (residual stream, norms, residual
    adds) is split along the sequence, (B, T/tp, d): f = all-gather forward / reduce-scatter
    backward, g = reduce-scatter forward / all-gather backward. f sits at the entrance of
    `attention`, `feed_forward` and `output` (forward pre-hooks), so wq, wk and wv (and w1, w3)
    share one f; g is inside the row-parallel linears, before their bias.

Communication, per micro-batch and tp rank: exactly the collectives this implementation
issues. N = B*T*d elements in the activation dtype; L = blocks on the stage; AR(n) =
all-reduce of n elements; AG(n) = all-gather whose output has n elements (each rank
contributes n/tp); RS(n) = reduce-scatter whose input has n elements (each rank keeps n/tp).

                                  forward                backward
    without SP  per block         2 AR(N)                2 AR(N)
                tok_embeddings    1 AR(N)                -
                output            -                      1 AR(N)
    with SP     per block         2 AG(N) + 2 RS(N)      2 RS(N) + 2 AG(N)
                tok_embeddings    1 RS(N)                1 AG(N)
                output            1 AG(N)                1 RS(N)
    loss, both  vocab_parallel_   1 AR-max(B*T) and      -
                cross_entropy     1 AR(2*B*T), float32

    SP only, once per optimizer step (sync_sequence_parallel_grads): 1 AR(P_rep) in the
    gradient dtype, P_rep = the stage's replicated parameters: every norm weight (and
    LayerNorm bias), every row-parallel bias, pos_embeddings. Whole model: llama
    (2L+1)*d; gpt2 2*(2L+1)*d + 2*L*d + max_seq_len*d.

With ring algorithms an AR(n) sends 2(tp-1)/tp * n elements per rank and an AG(n) or an
RS(n) (tp-1)/tp * n, so a block moves 8(tp-1)/tp * N elements per micro-batch in both
modes: sequence parallelism saves activation memory, not bandwidth. Activation
checkpointing re-runs each block's forward collectives in backward (+2 AR(N), or +2 AG(N)
+ 2 RS(N), per block). `tp_communication()` returns the per-micro-batch table as data for
profiling tests; gather_vocab_logits / gather_tp_state_dict are outside training steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import family_spec
from meshlm.model.tp_rules import check_layout_supported
from meshlm.parallel.tp_collectives import Collective, enter_tp_region, exit_tp_region, split_seq, tp_communication
from meshlm.parallel.tp_plan import ShardRules, shard_rules
from meshlm.parallel.vocab_parallel import (
    TensorParallelVocabOps,
    VocabParallelEmbedding,
    pad_vocab_rows,
    padded_vocab_size,
)
from meshlm.parallel.wrappers import local_tensor, unwrap_module

__all__ = [
    "apply_tensor_parallel",
    "is_tp_sharded",
    "tp_shard_dim",
    "sync_sequence_parallel_grads",
    "gather_tp_tensor",
    "gather_tp_state_dict",
    "shard_state_dict",
    "TensorParallelInfo",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SequenceParallelPositionEmbedding",
    "Collective",
    "tp_communication",
]


@dataclass(frozen=True)
class TensorParallelInfo:
    """What apply_tensor_parallel did, kept on the model as `model.tensor_parallel`."""

    tp: int
    tp_rank: int
    sequence_parallel: bool
    vocab_size: int
    padded_vocab_size: int


# ----------------------------------------------------------------------------- naming rule


def tp_shard_dim(fqn: str, cfg: ModelConfig) -> int | None:
    """The dimension along which parameter `fqn` of a `cfg` model is split under TP (None:
    replicated), from the family's tensor-parallel plan."""
    return shard_rules(cfg).shard_dim(fqn)


def is_tp_sharded(fqn: str, cfg: ModelConfig) -> bool:
    return tp_shard_dim(fqn, cfg) is not None


# ----------------------------------------------------------------------------- layers


class ColumnParallelLinear(nn.Linear):
    """y_r = x A_r^T + b_r with rank r's rows of A (output features). No communication here:
    the f in front is the region entrance hook of the enclosing module."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = weight
        if bias is not None:
            self.bias = bias


class ColumnParallelConv1d(nn.Conv1d):
    """A Conv1d holding rank r's output channels (and their bias): like ColumnParallelLinear,
    no communication here; the f in front is the region entrance hook."""

    def __init__(self, full: nn.Conv1d, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__(
            full.in_channels,
            weight.shape[0],
            full.kernel_size,
            stride=full.stride,
            padding=full.padding,
            dilation=full.dilation,
            groups=full.groups,
            bias=bias is not None,
            padding_mode=full.padding_mode,
            device="meta",
        )
        self.weight = weight
        if bias is not None:
            self.bias = bias


class RowParallelLinear(nn.Linear):
    """y = g(x_r B_r^T) + b with rank r's columns of B (input features); the replicated bias
    is added once, after the reduction (all-reduce, or reduce-scatter along the sequence)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group: ProcessGroup, sequence_parallel: bool):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = exit_tp_region(F.linear(x, self.weight), self.group, self.sequence_parallel)
        return y + self.bias if self.bias is not None else y


class SequenceParallelPositionEmbedding(nn.Embedding):
    """gpt2's learned positions under sequence parallelism: the model asks for
    positions arange(T) and adds them to this rank's (B, T/tp, d) chunk, so only this
    rank's positions are looked up. The weight stays replicated; its gradient covers
    only these rows and is summed by sync_sequence_parallel_grads."""

    def __init__(self, weight: nn.Parameter, group: ProcessGroup):
        super().__init__(weight.shape[0], weight.shape[1], device="meta")
        self.weight = weight
        self.group = group

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        local = split_seq(positions.unsqueeze(0), self.group).squeeze(0)  # (T/tp,)
        return F.embedding(local, self.weight)


def _enter_region_hook(group: ProcessGroup, sequence_parallel: bool, module: nn.Module, args: tuple):
    """Forward pre-hook: f on the first argument (the region's input)."""
    return (enter_tp_region(args[0], group, sequence_parallel), *args[1:])


# ----------------------------------------------------------------------------- applying


def _shard(t: torch.Tensor, fqn: str, tp_rank: int, tp: int, rules: ShardRules, vocab_size: int) -> torch.Tensor:
    dim = rules.shard_dim(fqn)
    if dim is None:
        return t
    if rules.is_vocab(fqn):
        t = pad_vocab_rows(t, vocab_size, tp, dim)
    if t.shape[dim] % tp:
        raise ConfigError(f"'{fqn}' has {t.shape[dim]} entries along dim {dim}, not divisible by tp ({tp}).")
    size = t.shape[dim] // tp
    return t.narrow(dim, tp_rank * size, size).clone()


def _shard_param(
    p: nn.Parameter | None, fqn: str, tp_rank: int, tp: int, rules: ShardRules, vocab_size: int
) -> nn.Parameter | None:
    if p is None:
        return None
    with torch.no_grad():
        return nn.Parameter(_shard(p.detach(), fqn, tp_rank, tp, rules, vocab_size), requires_grad=p.requires_grad)


def apply_tensor_parallel(model: nn.Module, tp_group: ProcessGroup, sequence_parallel: bool = False) -> None:
    """Turn a full single-device model (or a pipeline stage of one) into this rank's
    tensor-parallel shard, in place, following its family's TensorParallelPlan: the local
    shards are sliced out of the full weights (identical on every rank when built with the same
    seed), so the result computes the same function. Parameter names are unchanged. Build the
    optimizer afterwards.

    sequence_parallel: the hidden states between regions are (B, T/tp, d). A stage with the
    vocabulary embedding takes (B, T) tokens; one without takes sequence-sharded hidden states.
    A stage with the output layer returns local logits (B, T, V_pad/tp), one without returns
    sequence-sharded hidden states. Call sync_sequence_parallel_grads after backward."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise RuntimeError("apply_tensor_parallel was already applied to this model")
    tp, rank, cfg = dist.get_world_size(tp_group), dist.get_rank(tp_group), model.cfg
    check_layout_supported(cfg, tp=tp, sequence_parallel=sequence_parallel)
    rules = shard_rules(cfg)
    V = cfg.vocab_size
    V_pad = padded_vocab_size(V, tp)
    shard = functools.partial(_shard_param, tp_rank=rank, tp=tp, rules=rules, vocab_size=V)
    tied = family_spec(cfg).tied(cfg)
    modules = dict(model.named_modules())
    tied_source = modules.get(tied[0].rpartition(".")[0]) if tied else None
    tied_copy = modules.get(tied[1].rpartition(".")[0]) if tied else None
    is_tied = tied_source is not None and tied_copy is not None and tied_copy.weight is tied_source.weight
    replaced: dict[str, nn.Module] = {}
    for path, module in list(modules.items()):
        style = rules.style(path) if path else None
        if style is None:
            continue
        new = None
        if style == "column":
            new = _column(module, shard(module.weight, f"{path}.weight"), shard(module.bias, f"{path}.bias"))
        elif style == "row":
            new = RowParallelLinear(shard(module.weight, f"{path}.weight"), module.bias, tp_group, sequence_parallel)
        elif style == "vocab_embedding":
            new = VocabParallelEmbedding(
                shard(module.weight, f"{path}.weight"), rank * (V_pad // tp), tp_group, sequence_parallel
            )
        elif style == "vocab_output":
            if is_tied and module is tied_copy:
                weight = replaced[tied[0].rpartition(".")[0]].weight  # the embedding's shard itself
            else:
                weight = shard(module.weight, f"{path}.weight")
            new = ColumnParallelLinear(weight, shard(module.bias, f"{path}.bias"))
        elif style == "sequence_sliced_embedding" and sequence_parallel:
            new = SequenceParallelPositionEmbedding(module.weight, tp_group)
        elif style == "vocab_columns":  # the module stays; its tables become this rank's columns
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, shard(p, f"{path}.{name}" if path else name))
            module.vocab_ops = TensorParallelVocabOps(tp_group, rank * (V_pad // tp), V)
        if new is not None:
            parent, _, attr = path.rpartition(".")
            setattr(modules[parent] if parent else model, attr, new)
            replaced[path] = new
    for path, module in model.named_modules():
        if path and rules.is_region(path):
            module.register_forward_pre_hook(functools.partial(_enter_region_hook, tp_group, sequence_parallel))
    model.tensor_parallel = TensorParallelInfo(tp, rank, sequence_parallel, V, V_pad)


def _column(module: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    if isinstance(module, nn.Conv1d):
        return ColumnParallelConv1d(module, weight, bias)
    return ColumnParallelLinear(weight, bias)


def _tp_info(model: nn.Module) -> TensorParallelInfo | None:
    for module in model.modules():  # through DDP-style wrappers
        info = getattr(module, "tensor_parallel", None)
        if isinstance(info, TensorParallelInfo):
            return info
    return None


# ----------------------------------------------------------------------------- gradients


@torch.no_grad()
def sync_sequence_parallel_grads(model: nn.Module, tp_group: ProcessGroup) -> int:
    """Under sequence parallelism every replicated parameter (norm weights and biases,
    row-parallel biases, pos_embeddings) saw only this rank's part of the sequence: sum
    its gradient over the tp group, in one flat all-reduce. Call once per optimizer step,
    after the last backward (accumulation is linear) and before clipping and the
    optimizer. A no-op without sequence parallelism. Returns the elements all-reduced."""
    info = _tp_info(model)
    if info is None or not info.sequence_parallel or info.tp == 1:
        return 0
    rules = shard_rules(unwrap_module(model).cfg)
    grads = [
        local_tensor(p.grad)
        for name, p in model.named_parameters()
        if p.grad is not None and rules.shard_dim(name) is None
    ]
    if not grads:
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat.numel()


# ----------------------------------------------------------------------------- state dicts


@torch.no_grad()
def gather_tp_tensor(fqn: str, local: torch.Tensor, tp_group: ProcessGroup, cfg: ModelConfig) -> torch.Tensor:
    """The full single-device tensor for parameter `fqn` (or its gradient) of a `cfg` model from
    every rank's shard: all-gathered along its shard dimension, vocabulary padding cut. Same on
    every rank."""
    rules = shard_rules(cfg)
    dim = rules.shard_dim(fqn)
    local = (local.full_tensor() if isinstance(local, DTensor) else local).detach()  # FSDP2: whole over dp first
    if dim is None:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    full = torch.cat(parts, dim=dim)
    return full.narrow(dim, 0, cfg.vocab_size).clone() if rules.is_vocab(fqn) else full


def _alias_key(key: str, t: torch.Tensor, rules: ShardRules) -> tuple:
    """Equal for the entries of tied weights (same memory, same view, same split), so they are
    gathered or sharded once and stay one tensor."""
    t = local_tensor(t)
    if t.is_meta or t.numel() == 0:
        return (key,)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), rules.shard_dim(key))


def gather_tp_state_dict(model: nn.Module, tp_group: ProcessGroup) -> dict[str, torch.Tensor]:
    """The full, unpadded state dict under the single-device names, identical on every tp
    rank. Tied weights appear under both keys (as in model.state_dict()), as one tensor."""
    info = _tp_info(model)
    if info is None:
        raise ValueError("gather_tp_state_dict needs a model that apply_tensor_parallel has sharded")
    cfg = unwrap_module(model).cfg
    rules = shard_rules(cfg)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        ident = _alias_key(key, t, rules)
        if ident not in seen:
            seen[ident] = gather_tp_tensor(key, t, tp_group, cfg)
        out[key] = seen[ident]
    return out


def shard_state_dict(
    full_sd: dict[str, torch.Tensor], tp_rank: int, tp: int, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of gather_tp_state_dict: rank `tp_rank`'s shards (vocabulary padded) of a
    full single-device state dict of a `cfg` model, to load_state_dict into its tensor-parallel shard."""
    rules = shard_rules(cfg)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    for key, t in full_sd.items():
        ident = _alias_key(key, t, rules)
        if ident not in seen:
            seen[ident] = _shard(t, key, tp_rank, tp, rules, cfg.vocab_size)
        out[key] = seen[ident]
    return out
