"""Data parallelism: DDP (zero 0), FSDP2 `fully_shard` (zero 3) and HSDP.

ZeRO-1/2 live in `zero.py`: they leave the module alone and shard the optimizer
(and gradients) instead, so this file only wraps modules for zero 0 and 3.

    zero 0  DDP: parameters, gradients and optimizer state replicated; gradients
            all-reduced in buckets while backward still runs.
    zero 3  FSDP2: parameters sharded over dp and all-gathered per block just in
            time; gradients reduce-scattered; optimizer state sharded.
    HSDP    zero 3 with dp = dp_replicate x dp_shard: shard within a group,
            replicate (all-reduce) across groups.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from meshlm.distributed.dims import ParallelDims, ParallelMesh


def apply_data_parallel(
    module: nn.Module,
    blocks: nn.ModuleDict,
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    device,
    bucket_mb: float = 25.0,
) -> nn.Module:
    """Wrap one model part (the whole model or a pipeline stage) for data parallelism;
    `blocks` are its repeated blocks (FSDP's units)."""
    if dims.dp == 1 or dims.zero in (1, 2):
        return module
    if dims.zero == 0:
        return DistributedDataParallel(
            module,
            process_group=mesh.group("dp"),
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=bucket_mb,
            # The first bucket also 25 MB (PyTorch's default first bucket is 1 MB): fewer, larger
            # all-reduces, and the byte count per step stays a closed form of the model size.
            gradient_as_bucket_view=True,
        )
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh.fsdp_mesh()
    # One FSDP unit per block (all-gathered just before it runs, freed after), the rest
    # (embeddings, final norm, output) in the root unit, as torchtitan does.
    for block in blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=True)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=True)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The model part under any DDP wrapper (FSDP2 modifies modules in place)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def gradient_sync(module: nn.Module, enabled: bool):
    """A context in which backward does (or does not) synchronise gradients across dp:
    accumulation micro-steps skip the all-reduce / reduce-scatter, the last one does it."""
    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
