"""Prepacked linear layers for decoding: any family's large nn.Linear modules, swapped in the
engine's copy of the model for a oneDNN equivalent with the weight reordered once.

On CPU in float32, oneDNN with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the same kernel torch.compile uses on CPU after
freezing) beats F.linear on larger matrices. Measured on the benchmark machine (AMD EPYC,
1 thread, batch 16 x 256 -> 4096): 617 us with F.linear (MKL) against 358 us prepacked; below
~2^18 weight elements oneDNN's fixed cost per call (~15 us) makes it slower than F.linear, so
small matrices stay plain. Prepacked weights are copies: they cost one more copy of those
weights' memory and do not follow later changes of the model's parameters (build a new engine
after changing the weights).

Row-parallel layers (tensor parallelism) keep their all-reduce: the partial products are
summed over the group (Megatron's g) before the replicated bias is added.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from meshlm.parallel.tensor_parallel import RowParallelLinear

PACK_MIN_ELEMENTS = 1 << 18


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacked linears: CPU, float32, a torch built with oneDNN."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """y = x W^T (+ all-reduce over the row-parallel group) (+ b), W prepacked for oneDNN."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 16):
        super().__init__()
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = linear.group if isinstance(linear, RowParallelLinear) else None
        # Row-parallel: the bias is replicated and added once, after the reduction.
        self.bias, self.bias_after = (None, bias) if self.group is not None else (bias, None)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        if self.group is not None:
            dist.all_reduce(y, group=self.group)  # g: sum the rank's partial products
        return y + self.bias_after if self.bias_after is not None else y


def prepack_linears(model: nn.Module, min_elements: int | None = None) -> int:
    """Swap every nn.Linear of at least `min_elements` weight elements (default
    PACK_MIN_ELEMENTS) for a PackedLinear, in place; returns how many were swapped."""
    limit = PACK_MIN_ELEMENTS if min_elements is None else min_elements
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if _packable(child) and child.weight.numel() >= limit:
                packed = PackedLinear(child)
                # the module's hooks (e.g. a tensor-parallel region entrance) stay in front of it
                packed._forward_pre_hooks, packed._forward_hooks = child._forward_pre_hooks, child._forward_hooks
                setattr(module, name, packed)
                swapped += 1
    return swapped


def _packable(module) -> bool:
    """nn.Linear, or a subclass computing the same (a column-parallel shard) or a row-parallel one."""
    return isinstance(module, nn.Linear) and (
        type(module).forward is nn.Linear.forward or isinstance(module, RowParallelLinear)
    )
