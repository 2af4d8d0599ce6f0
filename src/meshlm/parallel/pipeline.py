"""Pipeline parallelism on top of torch.distributed.pipelining.

The model is cut into stages of consecutive blocks (pipeline_split: stage 0 also holds the
embeddings, the last stage the final norm and the output layer); each pipeline rank holds one
stage (gpipe, 1f1b), several looped stages (interleaved-1f1b, interleaved-zero-bubble:
rank r holds r, r + pp, ...) or two stages in a V (zbv: rank r holds r and 2 pp - 1 - r).
A batch is split into micro-batches that flow through the stages; torch's schedules decide
the order of forwards and backwards on each rank and do the point-to-point sends.

This module runs a split model: the cut and the placement live in pipeline_split.py, and
`parallelize()` (parallelize.py) applies them in its fixed order (split, then tensor parallel,
checkpointing, compile and data parallel on each stage module) before calling
`build_schedule` here. Each training step then calls `pipeline_step` (the trainer's StepRunner
sums the tied-embedding gradients and clips afterwards); evaluation calls
`pipeline_forward_eval`. `record_schedule_timeline` / `plot_pipeline_timeline` draw what a
schedule did (docs/img/pipeline_*.png).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.nn.parallel import DistributedDataParallel

from meshlm.config import MULTI_STAGE_SCHEDULES
from meshlm.parallel.pipeline_split import (
    TiedEmbeddingSync,
    _unwrap,
    build_stage_module,
    stage_ids_for_rank,
    stage_layer_counts,
    stage_pp_rank,
)

__all__ = [
    "stage_layer_counts",
    "stage_ids_for_rank",
    "stage_pp_rank",
    "build_stage_module",
    "TiedEmbeddingSync",
    "PipelineSchedule",
    "build_schedule",
    "pipeline_step",
    "pipeline_forward_eval",
    "record_schedule_timeline",
    "plot_pipeline_timeline",
    "TimelineEvent",
]

SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "interleaved-zero-bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}


# ----------------------------------------------------------------------------- schedules


class MicrobatchMeanLoss:
    """loss_fn(output, target) / n_microbatches.

    How gradients are scaled over micro-batches: the schedule calls backward once per
    micro-batch and the gradients accumulate (sum) in .grad. With equal-sized micro-batches the
    mean loss over the whole batch is the mean of the micro-batch means, (1/n) sum_i L_i, so
    each micro-batch's loss is divided by n before its backward and the accumulated gradient is
    exactly the gradient of the batch mean. torch's own alternative (scale_grads=True divides
    .grad by n after the last backward) is switched off: it would also divide gradients the
    caller accumulated over several steps. As in torchtitan, the per-micro-batch losses the
    schedule reports are therefore already divided by n, and their sum is the batch mean.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_microbatches: int):
        self.loss_fn, self.n_microbatches = loss_fn, n_microbatches

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target) / self.n_microbatches


@dataclass
class PipelineSchedule:
    """A torch schedule and what meshlm needs beside it (the stages, the micro-batch count and
    loss, the DDP modules whose gradients pipeline_step reduces)."""

    torch_schedule: object  # ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ...
    stages: list[PipelineStage]
    n_microbatches: int
    loss_fn: MicrobatchMeanLoss
    ddp_modules: list[DistributedDataParallel]


def build_schedule(
    stage_modules: list[nn.Module],
    stage_ids: list[int],
    n_stages: int,
    pp_group,
    device,
    n_microbatches: int,
    schedule_name: str,
    loss_fn: Callable,
) -> PipelineSchedule:
    """The schedule running this rank's stages: a PipelineStage per module and the torch
    schedule class for `schedule_name` (one stage for gpipe / 1f1b, the list otherwise).

    Modules may be wrapped (FSDP2, compiled blocks, DDP). FSDP2 modules go to the stage as they
    are (torch's stages defer their reduce-scatter to the end of the step). DDP does not: in
    torch 2.13 the stage's DDP path fails from the second step (the reducer's bucket rebuild
    counts every micro-batch's backward) and gives wrong gradients under zero-bubble schedules.
    So the stage runs the module inside DDP, DDP's hooks stay idle (its forward never runs),
    and pipeline_step all-reduces and averages the gradients over DDP's process group after
    the schedule, in DDP-sized buckets: exact, at the price of no overlap with the last backward.

    loss_fn(output, target) -> scalar mean over the micro-batch (e.g. lm_loss); see
    MicrobatchMeanLoss for the gradient scaling. Shapes are inferred on the first step (one
    extra forward per stage), so every step must use the same batch shape. Micro-batch counts:
    1f1b needs n >= pp; interleaved schedules need n divisible by max(1, n // pp) (use a
    multiple of pp); zero-bubble schedules do not work with torch.compile'd stages.
    """
    if schedule_name not in SCHEDULE_CLASSES:
        raise ValueError(f"unknown pipeline schedule {schedule_name!r}; expected one of {', '.join(SCHEDULE_CLASSES)}")
    if len(stage_modules) != len(stage_ids) or not stage_ids:
        raise ValueError(f"{len(stage_modules)} stage modules for stage ids {stage_ids}")
    multi = schedule_name in MULTI_STAGE_SCHEDULES
    if not multi and len(stage_ids) != 1:
        raise ValueError(f"the {schedule_name} schedule runs one stage per rank, got stages {stage_ids}")
    device = torch.device(device)
    ddp_modules = [m for m in stage_modules if isinstance(m, DistributedDataParallel)]
    stages = [
        PipelineStage(_unwrap(module), stage_id, n_stages, device, group=pp_group)
        for module, stage_id in zip(stage_modules, stage_ids)
    ]
    loss = MicrobatchMeanLoss(loss_fn, n_microbatches)
    torch_schedule = SCHEDULE_CLASSES[schedule_name](
        stages if multi else stages[0], n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False
    )
    return PipelineSchedule(torch_schedule, stages, n_microbatches, loss, ddp_modules)


@torch.no_grad()
def _all_reduce_ddp_grads(ddp_modules: list[DistributedDataParallel]) -> None:
    """Average the gradients over each DDP module's process group, as DDP would have."""
    for ddp in ddp_modules:
        group = ddp.process_group
        size = dist.get_world_size(group)
        grads = [p.grad for p in ddp.module.parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        for i, grad in enumerate(grads):
            bucket.append(grad)
            if i == len(grads) - 1 or sum(g.numel() * g.element_size() for g in bucket) >= ddp.bucket_bytes_cap:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=group)  # gloo has no AVG: sum, then divide
                flat /= size
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket = []


def _mean_loss(losses: list[torch.Tensor] | None, schedule: PipelineSchedule, pp_group) -> float:
    """Sum of the (already 1/n-scaled) micro-batch losses on the last stage's rank, zero
    elsewhere, summed over the pp group: every rank gets the last stage's value exactly."""
    if losses is not None:
        total = torch.stack([loss.detach().float() for loss in losses]).sum()
    else:
        total = torch.zeros((), dtype=torch.float32, device=schedule.stages[0].device)
    dist.all_reduce(total, group=pp_group)
    return total.item()


def pipeline_step(
    schedule: PipelineSchedule,
    stage_ids: list[int],
    n_stages: int,
    pp_group,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
) -> float:
    """One forward + backward of the whole batch through the pipeline; returns the mean loss over
    its micro-batches, the same on every rank of the pp group. x (B, T) token ids are used on
    the rank holding stage 0, y (B, T) targets on the one holding the last stage; other ranks
    may pass None. Gradients accumulate into .grad: zeroing them is the caller's job."""
    first, last = 0 in stage_ids, n_stages - 1 in stage_ids
    n = schedule.n_microbatches
    for name, t in (("x", x if first else None), ("y", y if last else None)):
        if t is not None and t.shape[0] % n:
            # unequal micro-batches would make the mean of micro-batch means differ from the batch mean
            raise ValueError(f"the batch ({name}: {t.shape[0]} sequences) must divide into {n} equal micro-batches")
    losses: list[torch.Tensor] | None = [] if last else None
    schedule.torch_schedule.step(
        *((x,) if first else ()), target=y if last else None, losses=losses, return_outputs=False
    )
    _all_reduce_ddp_grads(schedule.ddp_modules)
    return _mean_loss(losses, schedule, pp_group)


_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send_activation(h: torch.Tensor, dst: int, pp_group) -> list:
    """Non-blocking send of a (B, T, d) activation, preceded by a header (shape, dtype)."""
    if h.dim() != 3:
        raise ValueError(f"expected a (B, T, d) activation between stages, got shape {tuple(h.shape)}")
    header = torch.tensor([*h.shape, _WIRE_DTYPES.index(h.dtype)], dtype=torch.int64, device=h.device)
    h = h.contiguous()
    works = [dist.isend(header, group=pp_group, group_dst=dst), dist.isend(h, group=pp_group, group_dst=dst)]
    return [(work, header, h) for work in works]  # keep the buffers alive until the sends complete


def _recv_activation(src: int, pp_group, device: torch.device) -> torch.Tensor:
    header = torch.empty(4, dtype=torch.int64, device=device)
    dist.recv(header, group=pp_group, group_src=src)
    *shape, dtype = header.tolist()
    h = torch.empty(shape, dtype=_WIRE_DTYPES[dtype], device=device)
    dist.recv(h, group=pp_group, group_src=src)
    return h


def pipeline_forward_eval(
    schedule: PipelineSchedule,
    stage_ids: list[int],
    n_stages: int,
    pp_group,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    reduce_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float | torch.Tensor:
    """The mean loss over the batch, forward only, the same on every rank of the pp group.
    With `reduce_fn(output, target) -> 1-D tensor` (statistics that add up over micro-batches,
    e.g. a loss sum and a count, or confusion counts), the sum of its values over the
    micro-batches instead, as a tensor of that shape on every rank.

    A forward-only GPipe pass written here rather than torch's schedule.eval(): in torch 2.13
    eval() fails on V schedules (zbv: the backward-input action asks a stage without backward
    for its input gradients), and switching a schedule between eval and training makes it
    re-infer its shapes (a vote and one forward per stage) on both sides. Stages run in global
    order, all micro-batches of one stage before the next, with non-blocking sends, so stage s
    works on micro-batch i + 1 while stage s + 1 takes micro-batch i. It uses the schedule's
    stages, stage-to-rank placement, micro-batch count and loss function, so the loss is the
    same mean as pipeline_step's (without the backward)."""
    stages = {stage.stage_index: stage for stage in schedule.stages}
    if sorted(stages) != sorted(stage_ids):
        raise ValueError(f"stage ids {stage_ids} differ from the schedule's stages {sorted(stages)}")
    owner = stages[stage_ids[0]].stage_index_to_group_rank  # stage -> pp group rank (looped or V)
    me = dist.get_rank(pp_group)
    n, loss_fn = schedule.n_microbatches, schedule.loss_fn  # MicrobatchMeanLoss: loss / n per micro-batch
    device = torch.device(stages[stage_ids[0]].device)
    x_mbs = torch.tensor_split(x, n) if 0 in stages else None
    y_mbs = torch.tensor_split(y, n) if n_stages - 1 in stages else None
    total = None if reduce_fn is not None else torch.zeros((), dtype=torch.float32, device=device)
    sends: list = []
    carried: list[torch.Tensor] = []  # outputs of the previous stage when it is on this rank
    with torch.no_grad():
        for s in sorted(stages):
            outputs = []
            for mb in range(n):
                if s == 0:
                    h = x_mbs[mb]
                elif owner[s - 1] == me:
                    h = carried[mb]
                else:
                    h = _recv_activation(owner[s - 1], pp_group, device)
                out = stages[s].submod(h)
                if s == n_stages - 1:
                    if reduce_fn is not None:
                        value = reduce_fn(out, y_mbs[mb]).to(torch.float64)
                        total = value if total is None else total + value
                    else:
                        total += loss_fn(out, y_mbs[mb]).float()
                elif owner[s + 1] == me:
                    outputs.append(out)
                else:
                    sends += _send_activation(out, owner[s + 1], pp_group)
            carried = outputs
    for work, *_ in sends:
        work.wait()
    if reduce_fn is not None:
        # Only the last stage's rank knows the statistics' shape: it tells the others first.
        size = torch.tensor([total.numel() if total is not None else 0], dtype=torch.int64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=pp_group)
        if total is None:
            total = torch.zeros(int(size.item()), dtype=torch.float64, device=device)
        flat = total.reshape(-1).contiguous()
        dist.all_reduce(flat, group=pp_group)
        return flat.view_as(total)
    dist.all_reduce(total, group=pp_group)
    return total.item()


# ----------------------------------------------------------------------------- timeline


@dataclass
class TimelineEvent:
    """One action of a stage: kind F (forward), B (full backward), I (backward for inputs),
    W (backward for weights); start / end in seconds (time.time(), comparable across ranks of one machine)."""

    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


class ScheduleTimeline:
    """Records when each stage action runs, by wrapping the stages' forward_one_chunk /
    backward_one_chunk / backward_weight_one_chunk (torch's schedules have no hooks; they only
    emit profiler record_function ranges). On CUDA each action synchronises the device first
    and last, so the times are true but the run is slower: a diagnostic mode."""

    def __init__(self, schedule: PipelineSchedule):
        self.events: list[TimelineEvent] = []
        self._stages = schedule.stages
        self._cuda = any(torch.device(s.device).type == "cuda" for s in self._stages)

    def _timed(self, stage, method: Callable, kind_of: Callable[..., str]) -> Callable:
        def run(chunk_id: int, *args, **kwargs):
            kind = kind_of(*args, **kwargs)
            if kind != "F" and not stage.has_backward:  # a backward call that does nothing
                return method(chunk_id, *args, **kwargs)
            if self._cuda:
                torch.cuda.synchronize(stage.device)
            start = time.time()
            result = method(chunk_id, *args, **kwargs)
            if self._cuda:
                torch.cuda.synchronize(stage.device)
            self.events.append(TimelineEvent(kind, stage.stage_index, chunk_id, start, time.time()))
            return result

        return run

    def __enter__(self) -> ScheduleTimeline:
        for stage in self._stages:
            stage.forward_one_chunk = self._timed(stage, stage.forward_one_chunk, _forward_kind)
            stage.backward_one_chunk = self._timed(stage, stage.backward_one_chunk, _backward_kind)
            stage.backward_weight_one_chunk = self._timed(stage, stage.backward_weight_one_chunk, lambda *a, **k: "W")
        return self

    def __exit__(self, *exc) -> None:
        for stage in self._stages:  # drop the instance attributes: the class methods show through again
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                stage.__dict__.pop(name, None)

    def gather(self, pp_group) -> list[list[TimelineEvent]]:
        """Every pp rank's events, indexed by pp rank (collective over the pp group)."""
        out: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(out, self.events, group=pp_group)
        return out


def _forward_kind(*args, **kwargs) -> str:
    return "F"


def _backward_kind(*args, full_backward: bool = True, **kwargs) -> str:
    return "B" if full_backward else "I"


def record_schedule_timeline(schedule: PipelineSchedule) -> ScheduleTimeline:
    """`with record_schedule_timeline(schedule) as timeline: pipeline_step(...)`, then
    `timeline.gather(pp_group)` on every pp rank and plot_pipeline_timeline on one."""
    return ScheduleTimeline(schedule)


_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868"}


def plot_pipeline_timeline(
    events_per_rank: list[list[TimelineEvent]], path_png: str, title: str = "pipeline schedule as it ran"
) -> None:
    """One row per pp rank, one block per action (F forward, B backward, I backward-input,
    W backward-weight), labelled stage.microbatch, time in ms from the first action."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min((e.start for events in events_per_rank for e in events), default=0.0)
    t1 = max((e.end for events in events_per_rank for e in events), default=1.0)
    span_ms = max((t1 - t0) * 1e3, 1e-6)
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(events_per_rank) + 1.5))
    for rank, events in enumerate(events_per_rank):
        for e in events:
            start, width = (e.start - t0) * 1e3, (e.end - e.start) * 1e3
            ax.broken_barh(
                [(start, width)],
                (rank - 0.4, 0.8),
                facecolors=_COLOURS.get(e.kind, "grey"),
                edgecolors="black",
                linewidth=0.3,
            )
            if width > span_ms / 60:
                ax.text(start + width / 2, rank, f"{e.stage}.{e.microbatch}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(events_per_rank)), [f"pp rank {r}" for r in range(len(events_per_rank))])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms); blocks labelled stage.microbatch")
    ax.set_title(title)
    kinds = sorted({e.kind for events in events_per_rank for e in events}, key="FBIW".index)
    names = {"F": "forward", "B": "backward", "I": "backward (inputs)", "W": "backward (weights)"}
    ax.legend(
        handles=[Patch(color=_COLOURS[k], label=names[k]) for k in kinds],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
