"""Activation checkpointing: keep only each block's input, recompute the rest in backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every transformer block (non-reentrant checkpointing, as torchtitan does).
    The wrapper keeps parameter names readable through `_checkpoint_wrapped_module` being
    stripped from state_dict keys."""
    for name, block in list(model.layers.named_children()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
