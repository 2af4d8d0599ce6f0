"""Count the collectives of a training step, per mesh axis: how many calls and how many bytes,
and time what they cost: how long each rank waited in them, and how unevenly the ranks computed.

`train.profile_comm=true` wraps each step in a `CommProfiler`, which temporarily replaces
the `torch.distributed` functions that DDP's comm hook, FSDP2, the pipeline schedules and
meshlm's tensor-parallel code call, and attributes every call to the axis of its process
group ("dp", "tp", "pp", "world", ...). DDP's C++ reducer is made visible by registering
PyTorch's default all-reduce comm hook (same collective, issued from Python).

Bytes are the bytes of the buffer this rank passes in: the tensor of an all-reduce,
broadcast, send or receive; the local shard of an all-gather; the full input of a
reduce-scatter. docs/parallelism.md gives the closed forms per layout.

Time (`timing`, docs/parallelism.md explains how to read it):
  exposed communication  the time this rank's training thread was blocked in a collective: the
                         whole call of a blocking one, the `wait()` of an asynchronous one (its
                         handle is wrapped), so communication overlapped with computation does
                         not count. DDP waits for its buckets inside the backward, out of
                         Python's sight: its exposed time is taken from the launch of the last
                         bucket (the backward's computation is over then) to its completion.
                         Waiting for a pipeline peer (a bubble) counts here too.
  compute                the step's wall time minus the exposed communication.
  imbalance              the spread (max - min) of compute over the ranks: time the fastest rank
                         spends waiting for the slowest, whichever collective it waits in.
Measured with host clocks: on a GPU, collectives and kernels run asynchronously, so these
figures describe CPU (gloo) runs; use `train.trace` on a GPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, ClassVar

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


class _TimedWork:
    """The handle of an asynchronous collective: waiting on it counts as exposed communication."""

    def __init__(self, work, profiler: CommProfiler):
        self._work, self._profiler = work, profiler

    def wait(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._profiler.exposed_s += time.perf_counter() - started

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def _timed_works(works, profiler: CommProfiler):
    if isinstance(works, list):
        return [_TimedWork(w, profiler) if w is not None else None for w in works]
    return works


class CommProfiler:
    # The profiler of the step now running (DDP's comm hook, registered once, reports to it).
    active: ClassVar[CommProfiler | None] = None

    def __init__(self, axis_of_group: dict[int, str]):
        """axis_of_group: id(ProcessGroup) -> axis name; the default group is "world"."""
        self.axis_of_group = axis_of_group
        self.counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._saved: dict[str, Any] = {}
        self._in_pipeline_batch = False
        self.exposed_s = 0.0  # time blocked in collectives (see the module docstring)
        self._ddp_last_launch: float | None = None

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
            if kwargs.get("async_op"):
                work = fn(*args, **kwargs)
                return _TimedWork(work, self) if work is not None else None
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.exposed_s += time.perf_counter() - started

        return wrapper

    def _record_p2p(self, p2p_ops) -> None:
        for op in p2p_ops:
            self._record(getattr(op.op, "__name__", "p2p"), op.group, _nbytes(op.tensor))

    def _wrap_batch(self, fn):
        def wrapper(p2p_ops):
            if not self._in_pipeline_batch:
                self._record_p2p(p2p_ops)
                return _timed_works(fn(p2p_ops), self)
            return fn(p2p_ops)

        return wrapper

    def _wrap_pipeline_batch(self, fn):
        """torch's pipeline schedules send homogeneous batches op by op (isend/irecv called
        through the P2POp), bypassing batch_isend_irecv: count them at their entry point."""

        def wrapper(p2p_ops, *args, **kwargs):
            self._record_p2p(p2p_ops)
            self._in_pipeline_batch = True
            try:
                return _timed_works(fn(p2p_ops, *args, **kwargs), self)
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
        CommProfiler.active = self
        return self

    def __exit__(self, *exc) -> None:
        CommProfiler.active = None
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        from torch.distributed.pipelining import schedules

        schedules._batch_p2p = self._pipeline_batch

    def _ddp_bucket(self, last: bool, done: bool) -> None:
        """DDP's last bucket: launched (the backward's computation is over), then complete."""
        if not last:
            return
        now = time.perf_counter()
        if not done:
            self._ddp_last_launch = now
        elif self._ddp_last_launch is not None:
            self.exposed_s += max(0.0, now - self._ddp_last_launch)
            self._ddp_last_launch = None

    def timing(self, step_s: float) -> dict[str, float]:
        """This step's exposed communication and compute over every rank, and the imbalance
        (collective over the world: call it on every rank, after the profiled step)."""
        mine = (step_s - self.exposed_s, self.exposed_s)
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        compute = [c for c, _ in ranks]
        exposed = [e for _, e in ranks]
        return {
            "exposed_comm_s_mean": sum(exposed) / len(exposed),
            "exposed_comm_s_max": max(exposed),
            "compute_s_min": min(compute),
            "compute_s_max": max(compute),
            "imbalance_s": max(compute) - min(compute),
            "exposed_comm_fraction": sum(exposed) / len(exposed) / step_s if step_s > 0 else 0.0,
        }

    def report(self) -> dict[str, dict[str, dict[str, int]]]:
        """{axis: {op: {"count": n, "bytes": b}}}, sorted for stable output."""
        return {
            axis: {op: {"count": c, "bytes": b} for op, (c, b) in sorted(ops.items())}
            for axis, ops in sorted(self.counts.items())
        }


def make_ddp_visible(ddp_module) -> None:
    """Route DDP's bucket all-reduces through Python (the default hook, same collective), and
    time its last bucket for the profiler of the step running (see the module docstring)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(group, bucket):
        future = allreduce_hook(group, bucket)
        profiler = CommProfiler.active
        if profiler is None:
            return future
        last = bucket.is_last()
        profiler._ddp_bucket(last, done=False)

        def done(f):
            profiler._ddp_bucket(last, done=True)
            return f.value()

        return future.then(done)

    ddp_module.register_comm_hook(ddp_module.process_group, hook)


def format_comm(report: dict[str, dict[str, dict[str, int]]]) -> str:
    return (
        "; ".join(
            f"{axis}: " + ", ".join(f"{op} x{v['count']} ({v['bytes'] / 2**20:.3f} MiB)" for op, v in ops.items())
            for axis, ops in report.items()
        )
        or "none"
    )


def format_comm_time(timing: dict[str, float]) -> str:
    return (
        f"exposed communication {timing['exposed_comm_s_mean'] * 1e3:.1f} ms mean, "
        f"{timing['exposed_comm_s_max'] * 1e3:.1f} ms max ({timing['exposed_comm_fraction']:.0%} of the step); "
        f"compute {timing['compute_s_min'] * 1e3:.1f}-{timing['compute_s_max'] * 1e3:.1f} ms over the ranks "
        f"(imbalance {timing['imbalance_s'] * 1e3:.1f} ms)"
    )
