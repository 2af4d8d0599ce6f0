"""Single-tensor all-gather and reduce-scatter under their current names.

torch 2.13 names them `all_gather_single` / `reduce_scatter_single` (gloo supports both on
CPU); older releases call them `all_gather_into_tensor` / `reduce_scatter_tensor`. They are
looked up on every call, not bound at import, so that the communication profiler (which
wraps torch.distributed's functions for one step) sees these calls too.
"""

from __future__ import annotations

import torch.distributed as dist


def all_gather_single(output, input, group=None, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output, input, group=None, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)
