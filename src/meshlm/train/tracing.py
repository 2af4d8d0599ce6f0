"""`train.trace=true`: a torch.profiler Chrome trace per rank and, with pipeline parallelism,
a picture of the schedule as it ran (one row per pp rank, forward/backward blocks in time).

One step is traced: the third (or the last, in shorter runs), so that start-up work
(pipeline shape inference, allocator warm-up) is not what the picture shows.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from meshlm.parallel.parallelize import ParallelModel


def traced_step_index(steps: int) -> int:
    return min(2, steps - 1)


@contextlib.contextmanager
def trace_step(pm: ParallelModel, out_dir: Path, rank: int):
    """Profile the body; write DIR/traces/rank{R}.json and DIR/pipeline_schedule.png."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    timeline = None
    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(profile(activities=activities, record_shapes=False))
        if pm.schedule is not None:
            from meshlm.parallel.pipeline import record_schedule_timeline

            timeline = stack.enter_context(record_schedule_timeline(pm.schedule))
        yield
    traces = out_dir / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(traces / f"rank{rank}.json"))
    if timeline is not None:
        from meshlm.parallel.pipeline import plot_pipeline_timeline

        events = timeline.gather(pm.pp_group)
        if rank == 0:
            plot_pipeline_timeline(
                events,
                str(out_dir / "pipeline_schedule.png"),
                title=f"pipeline schedule as it ran ({pm.dims.describe})",
            )
    if dist.is_initialized():
        dist.barrier()
