"""Activation checkpointing: keep only each block's input, recompute the rest in backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(blocks: nn.ModuleDict) -> None:
    """Wrap every repeated block of a model (non-reentrant checkpointing, as torchtitan does).
    The wrapper keeps parameter names readable through `_checkpoint_wrapped_module` being
    stripped from state_dict keys."""
    for name, block in list(blocks.named_children()):
        blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
