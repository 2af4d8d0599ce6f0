"""Seeing through the wrappers parallelism adds: names, modules and sharded tensors.

Activation checkpointing, torch.compile, DDP and FSDP1 wrap modules and so insert parts into
parameter names (`layers.0._checkpoint_wrapped_module.attention.wq.weight`); FSDP2 and
tensor parallelism can turn tensors into DTensors. Everything that maps a parameter back to
the single-device model (gradient norms, gathering, checkpoints, tied embeddings) goes
through these three functions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# Name parts added by wrappers (activation checkpointing, torch.compile, FSDP1, DDP).
WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "module")


def clean_name(fqn: str) -> str:
    """The single-device model's name for a (possibly wrapped) parameter or module name."""
    return ".".join(p for p in fqn.split(".") if p not in WRAPPER_PARTS)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside any chain of wrappers (checkpointing, compile, DDP)."""
    while True:
        inner = next(
            (getattr(module, w) for w in WRAPPER_PARTS if isinstance(getattr(module, w, None), nn.Module)), None
        )
        if inner is None:
            return module
        module = inner


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2, DTensor tensor parallel), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t
