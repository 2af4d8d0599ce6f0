"""Gather the full single-device state dict from any layout, onto rank 0.

    FSDP (zero 3)  DTensor shards over dp  -> full_tensor()       (all dp ranks take part)
    TP             shards over tp           -> all_gather + cut the vocabulary padding
    PP             one stage per rank       -> gather_object to rank 0 from the (dp 0, tp 0) ranks

Used for the final `model.safetensors` and by the parity tests. Sharded checkpoints
(torch.distributed.checkpoint) never go through here: they stay sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshlm.config import ModelConfig
from meshlm.parallel.parallelize import ParallelModel
from meshlm.parallel.wrappers import clean_name


def gather_full_state_dict(pm: ParallelModel, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """Every rank must call this (it runs collectives); rank 0 gets the dict, others None."""
    local: dict[str, torch.Tensor] = {}
    for module in pm.modules():
        for name, value in module.state_dict().items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            local[clean_name(name)] = value.detach()
    if pm.dims.tp > 1:
        local = _gather_tp(local, pm, cfg)
    local = {k: v.cpu() for k, v in local.items()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    coords = pm.dims.coordinates(dist.get_rank())
    contributes = coords["dp"] == 0 and coords["tp"] == 0
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if contributes else None, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in (part or {}).items():
            full.setdefault(name, value)  # a tied output copy on the last stage equals the first stage's
    return full


def _gather_tp(local: dict[str, torch.Tensor], pm: ParallelModel, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    rules = pm.shard_rules
    out = {}
    for name, value in local.items():
        dim = rules.shard_dim(name)
        if dim is None:
            out[name] = value
            continue
        pieces = [torch.empty_like(value) for _ in range(pm.dims.tp)]
        dist.all_gather(pieces, value.contiguous(), group=pm.tp_group)
        full = torch.cat(pieces, dim=dim)
        if rules.is_vocab(name):
            full = full.narrow(dim, 0, cfg.vocab_size).clone()  # cut the padding to a multiple of tp
        out[name] = full
    return out
