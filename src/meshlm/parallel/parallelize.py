"""The one ordered function that turns a single-device model into the model that trains.

Order (DESIGN.md): pipeline split, then tensor parallel, activation checkpointing,
compile, and data parallel / sharding last, so each step wraps what the previous
produced.
"""

from __future__ import annotations

import torch
from torch import nn

from meshlm.config import Config
from meshlm.parallel.activation_checkpoint import apply_activation_checkpointing


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply activation checkpointing and compile (single process); returns the module to call."""
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        # Per block, as torchtitan does: small graphs compile fast and reuse across layers.
        for name, block in list(model.layers.named_children()):
            model.layers[name] = torch.compile(block)
    return model
