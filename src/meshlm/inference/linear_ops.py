"""The engine's matrix multiplies: the model's own weights, optionally fused and prepacked.

On CPU in float32 the engine can fuse q/k/v (and the SwiGLU gate/up pair) into one weight
and hand the larger matrices to oneDNN with the weight reordered once into its blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, the same kernel torch.compile uses on
CPU after freezing). Measured on the benchmark machine (AMD EPYC, 1 thread, batch 16 x 256
-> 4096): 617 us with F.linear (MKL) against 358 us prepacked; below ~2^18 weight elements
oneDNN's fixed cost per call (~15 us) makes it slower than F.linear, so small matrices stay
plain. Prepacked and fused weights are copies: they cost one more copy of those weights'
memory and do not follow later changes of the model's parameters (build a new engine
after changing the weights).

Row-parallel layers (tensor parallelism) keep their all-reduce: `Linear` sums the
partial products over the group (Megatron's g) before adding the replicated bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


class Linear:
    """y = x W^T (+ all-reduce over `group`) (+ b) for one weight or several fused along the
    output dimension; `split` gives the sizes of the fused outputs."""

    def __init__(self, modules: list[nn.Linear], pack: bool, group=None, batch_hint: int = 16):
        weights = [m.weight.detach() for m in modules]
        biases = [m.bias.detach() if m.bias is not None else None for m in modules]
        self.split = [w.shape[0] for w in weights]
        self.group = group
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.split)])
        # Row-parallel: the bias is replicated and added once, after the reduction.
        self.bias_after = bias if group is not None else None
        self.bias = None if group is not None else bias
        self.weight = weight
        self.packed = None
        if pack and weight.numel() >= PACK_MIN_ELEMENTS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)  # g: sum the rank's partial products
        if self.bias_after is not None:
            y = y + self.bias_after
        return y

    def parts(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.split, dim=-1) if len(self.split) > 1 else (y,)


def row_parallel_group(module: nn.Module):
    """The TP group of a row-parallel linear (its forward all-reduces), else None."""
    from meshlm.parallel.tensor_parallel import RowParallelLinear

    return module.group if isinstance(module, RowParallelLinear) else None
