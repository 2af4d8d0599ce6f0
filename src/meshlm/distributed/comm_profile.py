"""Count the collectives of a training step, per mesh axis: how many calls and how many bytes.

`train.profile_comm=true` wraps each step in a `CommProfiler`, which temporarily replaces
the `torch.distributed` functions that DDP's comm hook, FSDP2, the pipeline schedules and
meshlm's tensor-parallel code call, and attributes every call to the axis of its process
group ("dp", "tp", "pp", "world", ...). DDP's C++ reducer is made visible by registering
PyTorch's default all-reduce comm hook (same collective, issued from Python).

Bytes are the bytes of the buffer this rank passes in: the tensor of an all-reduce,
broadcast, send or receive; the local shard of an all-gather; the full input of a
reduce-scatter. docs/parallelism.md gives the closed forms per layout.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

# name -> index of the tensor argument whose size is counted (or a callable on the args)
_BYTES_ARG = {
    # isend/irecv are counted through batch_isend_irecv only: P2POp checks the identity of its
    # op against torch's own isend/irecv, so those two must stay unwrapped.
    "all_reduce": 0,
    "broadcast": 0,
    "send": 0,
    "recv": 0,
    "reduce": 0,
    "all_gather": 1,
    "all_gather_into_tensor": 1,
    "all_gather_single": 1,
    "_all_gather_base": 1,
    "reduce_scatter": 1,
    "reduce_scatter_tensor": 1,
    "reduce_scatter_single": 1,
    "_reduce_scatter_base": 1,
    "all_to_all_single": 1,
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommProfiler:
    def __init__(self, axis_of_group: dict[int, str]):
        """axis_of_group: id(ProcessGroup) -> axis name; the default group is "world"."""
        self.axis_of_group = axis_of_group
        self.counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._saved: dict[str, Any] = {}
        self._in_pipeline_batch = False

    def _axis(self, group) -> str:
        if group is None:
            return "world"
        if id(group) in self.axis_of_group:  # a mesh axis spanning every rank may reuse the world group
            return self.axis_of_group[id(group)]
        return "world" if group is dist.group.WORLD else "other"

    def _record(self, op: str, group, nbytes: int) -> None:
        entry = self.counts[self._axis(group)][op]
        entry[0] += 1
        entry[1] += nbytes

    def _wrap(self, name: str, fn):
        index = _BYTES_ARG[name]

        def wrapper(*args, **kwargs):
            tensor = (
                args[index]
                if len(args) > index
                else next(
                    (v for k, v in kwargs.items() if k in ("tensor", "input", "input_tensor", "input_list")), None
                )
            )
            self._record(name, kwargs.get("group", None), _nbytes(tensor))
            return fn(*args, **kwargs)

        return wrapper

    def _record_p2p(self, p2p_ops) -> None:
        for op in p2p_ops:
            self._record(getattr(op.op, "__name__", "p2p"), op.group, _nbytes(op.tensor))

    def _wrap_batch(self, fn):
        def wrapper(p2p_ops):
            if not self._in_pipeline_batch:
                self._record_p2p(p2p_ops)
            return fn(p2p_ops)

        return wrapper

    def _wrap_pipeline_batch(self, fn):
        """torch's pipeline schedules send homogeneous batches op by op (isend/irecv called
        through the P2POp), bypassing batch_isend_irecv: count them at their entry point."""

        def wrapper(p2p_ops, *args, **kwargs):
            self._record_p2p(p2p_ops)
            self._in_pipeline_batch = True
            try:
                return fn(p2p_ops, *args, **kwargs)
            finally:
                self._in_pipeline_batch = False

        return wrapper

    def __enter__(self) -> CommProfiler:
        for name in _BYTES_ARG:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._wrap_batch(self._saved["batch_isend_irecv"])
        from torch.distributed.pipelining import schedules

        self._pipeline_batch = schedules._batch_p2p
        schedules._batch_p2p = self._wrap_pipeline_batch(self._pipeline_batch)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        from torch.distributed.pipelining import schedules

        schedules._batch_p2p = self._pipeline_batch

    def report(self) -> dict[str, dict[str, dict[str, int]]]:
        """{axis: {op: {"count": n, "bytes": b}}}, sorted for stable output."""
        return {
            axis: {op: {"count": c, "bytes": b} for op, (c, b) in sorted(ops.items())}
            for axis, ops in sorted(self.counts.items())
        }


def make_ddp_visible(ddp_module) -> None:
    """Route DDP's bucket all-reduces through Python (the default hook, same collective)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp_module.register_comm_hook(ddp_module.process_group, allreduce_hook)


def format_comm(report: dict[str, dict[str, dict[str, int]]]) -> str:
    return (
        "; ".join(
            f"{axis}: " + ", ".join(f"{op} x{v['count']} ({v['bytes'] / 2**20:.3f} MiB)" for op, v in ops.items())
            for axis, ops in report.items()
        )
        or "none"
    )
