"""Data-parallel communication per step: its total time and the part on the critical path.

P = parameters on the rank (the most loaded one), e = bytes per gradient element on the wire,
buckets of Software.dp_bucket_bytes (each bucket one collective, paying the ring latency):

    DDP           all-reduce of P e in buckets; overlapped with the last micro-batch's backward where
                  the software does it (not after a pipeline flush in meshlm)
    ZeRO-1/2      reduce-scatter of the gradients + all-gather of the updated parameters; where the
                  software overlaps them (Megatron-Core's distributed optimizer with
                  --overlap-grad-reduce --overlap-param-gather) see below
    FSDP (ZeRO-3) per micro-batch an all-gather of the parameters forward and backward, one
                  reduce-scatter of the gradients per step; overlapped on GPUs

Overlapped ZeRO-1/2, as Megatron-Core does it. Gradients are reduced only in the last
micro-batch (no_sync before); a model chunk's buckets are reduce-scattered, one after the other
on one stream, as its last backward produces them. A rank holding v chunks of a looped pipeline
schedule (p stages) finishes chunk c's last backward while p backward passes of each of its
chunks c - 1 ... 0 are still to come, so the reduce-scatter of the deeper chunks hides behind
them and mostly chunk 0's stays exposed. The parameter all-gather mirrors it at the start of the
next step: chunk c's gather must be done by its first forward, which comes after p forward
passes of each earlier chunk (the first bucket before the first forward is always exposed). With
one chunk (no pipeline, or 1F1B) this is: exposed reduce-scatter = max(one bucket, RS - the
last micro-batch's backward), exposed all-gather = max(one bucket, AG - the first forward).
"""

from __future__ import annotations

from meshlm.plan import comm
from meshlm.plan.compute import PassTimes
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Software
from meshlm.plan.shapes import Chunk, ParamStats


def _queue_exposed(times: list[float], windows: list[float], spans: list[float], firsts: list[float]) -> float:
    """How far a stream of collectives runs past the end of the compute. Collective i (one per
    chunk, in order) may start when its chunk's pass starts, `windows[i] + spans[i]` before the
    end, and cannot end before its last bucket, `firsts[i]` after the pass ends (`windows[i]`
    before the end)."""
    finish = float("-inf")
    for t, window, span, first in zip(times, windows, spans, firsts):
        begin = max(finish, -(window + span))
        finish = max(begin + t, -window + first)
    return max(0.0, finish)


def _overlapped_zero(
    cluster: Cluster,
    group: comm.Group,
    layout: Layout,
    sw: Software,
    chunk_params: list[float],
    passes: list[PassTimes],
) -> tuple[float, float]:
    """(exposed, total) of Megatron-Core's overlapped reduce-scatter and all-gather (module docstring)."""
    bucket = sw.dp_bucket_bytes(layout.dp)  # gradient bytes; the parameters travel in buckets of as many elements
    pbucket = bucket * sw.param_comm_bytes / sw.grad_comm_bytes
    rs = [comm.bucketed_half(cluster, group, n * sw.grad_comm_bytes, bucket, "reduce_scatter") for n in chunk_params]
    ag = [comm.bucketed_half(cluster, group, n * sw.param_comm_bytes, pbucket, "all_gather") for n in chunk_params]
    rs_first = [comm.reduce_scatter(cluster, group, min(bucket, n * sw.grad_comm_bytes)) for n in chunk_params]
    ag_first = [comm.all_gather(cluster, group, min(pbucket, n * sw.param_comm_bytes)) for n in chunk_params]
    p = layout.pp if len(passes) > 1 else 0  # passes of each other chunk between two of this one's
    bwd = [x.bwd_input + x.bwd_weight for x in passes]
    fwd = [x.fwd for x in passes]
    # reduce-scatter: deepest chunk first; chunk c's last backward is followed by p backwards of chunks < c
    order = list(reversed(range(len(passes))))
    exposed_rs = _queue_exposed(
        [rs[c] for c in order],
        [p * sum(bwd[:c]) for c in order],
        [bwd[c] for c in order],
        [rs_first[c] for c in order],
    )
    # all-gather: chunk 0 first; chunk c's first forward comes after p forwards of chunks < c
    gathered, exposed_ag = 0.0, 0.0
    for c in range(len(passes)):
        before = p * sum(fwd[:c])
        exposed_ag = max(exposed_ag, gathered + ag_first[c] - before, gathered + ag[c] - before - fwd[c])
        gathered += ag[c]
    return exposed_rs + max(0.0, exposed_ag), sum(rs) + sum(ag)


def data_parallel(
    layout: Layout,
    cluster: Cluster,
    sw: Software,
    st: ParamStats,
    chunks: tuple[Chunk, ...],
    chunk_params: list[float],
    passes: list[PassTimes],
    micro: int,
) -> tuple[float, float]:
    """(exposed, total) seconds of data-parallel communication per step (with FSDP, and its work
    around the collectives), for the rank holding `st` (its `chunks`, their parameters and one
    micro-batch's pass through each)."""
    if layout.dp == 1:
        return 0.0, 0.0
    group = comm.place_group(cluster, layout.dp, layout.tp)
    P = st.numel
    grad_bytes = P * sw.grad_comm_bytes
    overlap = sw.dp_overlap if layout.pp == 1 else sw.pp_dp_overlap
    bucket = sw.dp_bucket_bytes(layout.dp)
    last_bwd = max(x.bwd_input + x.bwd_weight for x in passes)
    first_fwd = max(x.fwd for x in passes)
    if layout.zero == 0:
        total = comm.bucketed_all_reduce(cluster, group, grad_bytes, bucket)
        if not overlap:
            return total, total
        last = comm.all_reduce(cluster, group, min(bucket, grad_bytes))
        return max(total - last_bwd, last), total
    if layout.zero in (1, 2):
        if sw.zero_overlap:
            return _overlapped_zero(cluster, group, layout, sw, chunk_params, passes)
        rs = comm.bucketed_half(cluster, group, grad_bytes, bucket, "reduce_scatter")
        ag = comm.bucketed_half(cluster, group, P * sw.param_comm_bytes, bucket, "all_gather")
        return rs + ag, rs + ag
    # FSDP / HSDP
    shard = layout.dp // layout.dp_replicate
    shard_group = comm.place_group(cluster, shard, layout.tp)
    units = sum(c.layers for c in chunks) + 1
    param_bytes = P * sw.param_comm_bytes
    ag = comm.all_gather(cluster, shard_group, param_bytes / units, units)  # one pass over all units
    rs = comm.reduce_scatter(cluster, shard_group, grad_bytes / units, units)
    replicate = 0.0
    if layout.dp_replicate > 1:
        rep_group = comm.place_group(cluster, layout.dp_replicate, layout.tp * shard)
        replicate = comm.all_reduce(cluster, rep_group, grad_bytes / shard / units, units)
    total = micro * 2 * ag + rs + replicate
    work = _fsdp_work(cluster, sw, P, st.fsdp_shard(shard), st.tensors, units, micro)
    if not overlap:
        return total + work, total + work
    per_micro = max(0.0, ag - first_fwd) + max(0.0, ag - last_bwd) + ag / units
    exposed = micro * per_micro + max(0.0, rs + replicate - last_bwd) + (rs + replicate) / units
    return exposed + work, total + work


def _fsdp_work(cluster: Cluster, sw: Software, P: int, shard: int, tensors: int, units: int, micro: int) -> float:
    """FSDP2's own work around its collectives (torch.distributed.fsdp's fully_shard), on the critical
    path: per all-gather the shard is copied into the send buffer and the gathered output out into
    the unsharded parameters; accumulation micro-batches add into the unsharded gradients; the
    syncing backward copies them into the reduce-scatter buffer and the result, divided, into the
    sharded gradients. Its hooks' Python work (lazy checks, parameter swaps: a few ops per tensor
    and unit) counts on a CPU, where nothing runs ahead of it."""
    dev = cluster.device
    p, g = sw.param_bytes, sw.grad_bytes
    traffic = micro * 2 * 2 * (shard + P) * p  # two all-gathers per micro-batch: copy in, copy out (r + w)
    traffic += (micro - 1) * 3 * P * g + 2 * P * g + 3 * shard * g
    ops = micro * (2 * (4 * units + 3 * tensors) + 2 * tensors) + 6 * units + 4 * tensors
    return traffic / dev.elementwise_bandwidth + (ops * dev.op_overhead_s if dev.kind == "cpu" else 0.0)
