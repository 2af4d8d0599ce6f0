"""The gradient norm for clipping, global over every shard, stage and replica.

Each rank sums the squares of the gradient elements it holds, each divided by the
number of ranks holding an identical copy (`ParallelModel.grad_copies`), and one
all-reduce over the world adds them up: every element of the full gradient is then
counted exactly once, whatever the layout. The result is the same norm a single
process computes, so clipping is layout-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from meshlm.parallel.wrappers import local_tensor


def weighted_grad_sq_sum(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], copies: Callable[[str], float], device: torch.device
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in named_params:
        if p.grad is None:
            continue
        g = local_tensor(p.grad)
        total += g.float().pow(2).sum() / copies(name)
    return total


def global_norm(local_sq_sum: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        local_sq_sum = local_sq_sum.clone()
        dist.all_reduce(local_sq_sum)
    return local_sq_sum.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), never up."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def scale_grads_(params: Iterable[torch.nn.Parameter], coef: torch.Tensor) -> None:
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
