"""One layout's predicted step time and memory: the pieces of compute.py, memory.py and
comm.py put together over the pipeline schedule and the data-parallel reduction.

    step = pipeline (or accumulation) time + exposed data-parallel communication
           + optimizer step + the step's small collectives (loss, gradient norm, tied / SP grads)

    pipeline time, m micro-batches, p stages, chunk times t = f + b (forward, backward):
        no pipeline           m t
        gpipe, 1f1b           m max_rank(sum of its chunks' t) + (p - 1) max_chunk t
        interleaved-1f1b      the same with v chunks per rank: the bubble is (p - 1) / v of the rank's time
        interleaved-zb        bubble (p - 1) max(0, f + b_in - b_w)  (ZB-H1, Qi et al. 2023)
        zbv                   bubble (p - 1) max(0, f + b_in - 2 b_w) (ZB-V)
      (b_in: input-gradient backward, b_w: weight-gradient GEMMs; p2p sends on the critical path.)

    data parallel: data_parallel.py (DDP, ZeRO-1/2 with Megatron-Core's per-chunk overlap,
        FSDP2 with its copies); overlapped communication charges the compute beside it
        (comm.overlap_cost)

On the CPU (cpu-local) N processes share C cores. When N > C, compute is conserved: the step's
compute takes max(the schedule's critical path at full speed, all ranks' compute / C) (a rank
waiting in a bubble or a collective leaves its core to the others), and the collectives on the
critical path come on top (their measured in-situ cost includes waiting for a core).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from meshlm.model.stats import flops_per_token
from meshlm.plan import comm
from meshlm.plan.compute import PassTimes, block_pass, ends_pass, weight_traffic
from meshlm.plan.data_parallel import data_parallel
from meshlm.plan.hardware import Cluster, GiB
from meshlm.plan.layout import Layout, Software, Workload
from meshlm.plan.memory import Memory, layer_activation_bytes, rank_memory, shard_count
from meshlm.plan.shapes import (
    Chunk,
    chunk_numel,
    model_from_key,
    model_key,
    padded_vocab,
    rank_chunks,
    rank_stats,
    replicated_tp_params,
)


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    memory: Memory  # the most loaded rank
    fits: bool
    reason: str
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per step by cause
    memory_is_state: bool = False  # cpu-local: "memory" = params + grads + optimizer (what the trainer reports)
    meshlm_valid: bool = True
    invalid_reason: str = ""

    @property
    def memory_gb_per_device(self) -> float:
        """GiB (2^30 bytes), the unit GPU memory is sold in."""
        return (self.memory.state if self.memory_is_state else self.memory.total) / GiB

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "dp": lay.dp,
            "tp": lay.tp,
            "pp": lay.pp,
            "zero": lay.zero,
            "dp_replicate": lay.dp_replicate,
            "micro_batch": lay.micro_batch,
            "recompute": lay.recompute,
            "sequence_parallel": lay.sequence_parallel,
            "schedule": lay.schedule if lay.pp > 1 else None,
            "virtual_stages": lay.virtual_stages if lay.pp > 1 else 1,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_device": self.tflops_per_device,
            "mfu": self.mfu,
            "memory_gb_per_device": self.memory_gb_per_device,
            "memory_breakdown_gb": {
                "params": self.memory.params / GiB,
                "grads": self.memory.grads / GiB,
                "optimizer": self.memory.optimizer / GiB,
                "activations": self.memory.activations / GiB,
                "other": self.memory.other / GiB,
            },
            "fits": self.fits,
            "reason": self.reason,
            "time_breakdown_s": dict(self.breakdown),
            "meshlm_valid": self.meshlm_valid,
        }


def _bubble(layout: Layout, passes: list[PassTimes]) -> float:
    p = layout.pp
    if p == 1:
        return 0.0
    if layout.schedule == "interleaved-zero-bubble":
        return (p - 1) * max(max(0.0, x.fwd + x.bwd_input - x.bwd_weight) for x in passes)
    if layout.schedule == "zbv":
        return (p - 1) * max(max(0.0, x.fwd + x.bwd_input - 2 * x.bwd_weight) for x in passes)
    return (p - 1) * max(x.total for x in passes)


@functools.lru_cache(maxsize=16384)
def _cached_parts(workload_key: tuple, layout_key: tuple, cluster: Cluster, sw: Software) -> tuple:
    """(block, {(has_embedding, has_output): ends}) for one micro-batch: shared by every layout
    with the same tp, sequence parallelism, micro-batch and recomputation."""
    mkey, seq_len = workload_key
    workload = Workload(model_from_key(mkey), 1, seq_len)
    tp, sp, mb, recompute = layout_key
    layout = Layout(tp=tp, sequence_parallel=sp, micro_batch=mb, recompute=recompute)
    ends = {(e, o): ends_pass(workload, layout, cluster, sw, e, o) for e in (False, True) for o in (False, True)}
    return block_pass(workload, layout, cluster, sw), ends


def _chunk_times(parts: tuple, chunk: Chunk, cluster: Cluster, sw: Software, params: int) -> PassTimes:
    blk, ends = parts
    e = ends[(chunk.has_embedding, chunk.has_output)]
    L = chunk.layers
    return PassTimes(
        L * blk.fwd + e.fwd,
        L * blk.bwd_input + e.bwd_input,
        L * blk.bwd_weight + e.bwd_weight + weight_traffic(cluster, sw, params),
        L * blk.tp_fwd + e.tp_fwd,
        L * blk.tp_bwd + e.tp_bwd,
        L * blk.tp_hidden,
    )


def estimate(workload: Workload, layout: Layout, cluster: Cluster, sw: Software) -> Estimate:
    if cluster.device.kind == "gpu" and sw.act_bytes == 4 and cluster.device.fp32_peak_flops:
        cluster = replace(cluster, device=cluster.device.in_float32())  # float32 training: no tensor cores
    dev = cluster.device
    m = workload.model
    micro = layout.microbatches(workload.global_batch)
    chunks_by_rank = rank_chunks(workload, layout, sw.pipeline_split)
    n_stage = sum(len(c) for c in chunks_by_rank)
    pp_group = comm.place_group(cluster, layout.pp, layout.tp * layout.dp)
    tp_group = comm.place_group(cluster, layout.tp, 1)
    dp_group = comm.place_group(cluster, layout.dp, layout.tp)
    if cluster.measured_collectives and layout.pp > 1:
        # cpu-local: a pipeline's ranks compute m / (m + p - 1) of the time; only the busy ones compete
        # for the cores while the stages' collectives run
        busy = micro / (micro + layout.pp - 1)
        cluster = replace(cluster, active_processes=max(2.0, layout.world_size * busy))
    b, s = layout.micro_batch, workload.seq_len
    p2p_bytes = b * s * m.d_model * sw.residual_bytes / (layout.tp if layout.sequence_parallel else 1)
    p2p = comm.send_recv(cluster, pp_group.crosses_nodes, p2p_bytes) if layout.pp > 1 else 0.0
    if layout.pp > 1 and dev.kind == "cpu":
        p2p += _PIPELINE_ACTION_OPS * dev.op_overhead_s  # torch.distributed.pipelining's per-action Python work
    # cpu-local, N processes on C cores: see the end of this function
    share_cores = dev.kind == "cpu" and dev.cores and layout.world_size > dev.cores

    mkey = model_key(m)
    parts = _cached_parts(
        (mkey, s), (layout.tp, layout.sequence_parallel, layout.micro_batch, layout.recompute), cluster, sw
    )
    shards = (shard_count(layout),) if layout.zero == 3 and layout.dp > 1 else ()
    per_layer = (layer_activation_bytes(workload, layout, sw), layer_activation_bytes(workload, layout, sw, "none"))
    all_passes: list[PassTimes] = []
    rank_times, rank_comm, rank_tp, mems, stats = [], [], [], [], []
    rank_passes, rank_params = [], []  # per rank, per chunk
    for r, chunks in enumerate(chunks_by_rank):
        tied_copy = layout.pp > 1 and (len(chunks) > 1 or not any(c.has_embedding for c in chunks))
        total = comm_total = tp_total = 0.0
        rank_passes.append([])
        rank_params.append([])
        for c in chunks:
            numel = chunk_numel(mkey, layout.tp, c, tied_copy)
            base = _chunk_times(parts, c, cluster, sw, numel)
            p_in, p_out = (p2p if c.stage > 0 else 0.0), (p2p if c.stage < n_stage - 1 else 0.0)
            x = base.slowed(1.0, p_in, p_out)
            all_passes.append(x)
            rank_passes[-1].append(x)
            rank_params[-1].append(numel)
            total += x.total
            comm_total += x.tp_comm + p_in + p_out
            tp_total += x.tp_comm
        rank_times.append(total)
        rank_comm.append(comm_total)
        rank_tp.append(tp_total)
        st = rank_stats(mkey, layout.tp, chunks, layout.pp, shards)
        stats.append(st)
        mems.append(rank_memory(workload, layout, cluster, sw, chunks, st, r, per_layer))
    per_micro = max(rank_times)
    pipeline = micro * per_micro
    bubble = _bubble(layout, all_passes)
    slowest = rank_times.index(per_micro)
    tp_comm = micro * rank_tp[slowest]
    if share_cores:
        # N processes on C < N cores. Compute is conserved: the step takes at least all ranks' compute
        # divided by C, and at least the schedule's own critical path; a rank waiting (a pipeline
        # bubble, a collective) leaves its core to the others. The collectives on the critical path come
        # on top: their measured in-situ cost already includes waiting for a core.
        comm_path = micro * rank_comm[slowest] + (layout.pp - 1) * max(
            x.tp_comm + (p2p * 2 if layout.pp > 1 else 0.0) for x in all_passes
        ) * (bubble > 0)
        compute_path = pipeline + bubble - comm_path
        work = layout.dp * layout.tp * sum(micro * (t - c) for t, c in zip(rank_times, rank_comm))
        stretch = max(compute_path, work / dev.cores) - compute_path
        pipeline += stretch

    # ---- data parallel, optimizer, small collectives (on the rank holding the most parameters)
    heavy = max(range(len(stats)), key=lambda i: stats[i].numel)
    st, chunks = stats[heavy], chunks_by_rank[heavy]
    P = st.numel
    dp_exposed, dp_total = data_parallel(layout, cluster, sw, st, chunks, rank_params[heavy], rank_passes[heavy], micro)
    dp_exposed += (dp_total - dp_exposed) * comm.overlap_cost(cluster, dp_group)  # overlapped, it slows compute
    if layout.zero == 0 or layout.dp == 1:
        opt_elems = P
    elif layout.zero == 3:
        opt_elems = st.fsdp_shard(shard_count(layout))
    else:
        opt_elems = math.ceil(P / layout.dp)
    optimizer = (
        opt_elems * sw.optimizer_bytes_per_param / dev.elementwise_bandwidth
        + st.tensors * sw.optimizer_ops_per_tensor * (dev.op_overhead_s if dev.kind == "cpu" else 0.0)
    )
    if share_cores:
        optimizer *= layout.world_size / dev.cores  # every rank steps its optimizer at the same time
    world_group = comm.place_group(cluster, layout.world_size, 1)
    small = comm.all_reduce(cluster, world_group, 4)  # global gradient norm
    small += comm.all_reduce(cluster, dp_group, 4)  # loss mean over dp
    if layout.pp > 1:
        small += comm.all_reduce(cluster, pp_group, 4)  # loss from the last stage
        if m.tied:
            pair = comm.Group(2, 1, 2 if pp_group.crosses_nodes else 1)
            vocab = padded_vocab(m, layout.tp) // layout.tp
            small += comm.all_reduce(cluster, pair, vocab * m.d_model * sw.grad_comm_bytes)
    if layout.sequence_parallel:
        layers = sum(c.layers for c in chunks)
        rep = replicated_tp_params(m, layers, any(c.has_embedding for c in chunks), any(c.has_output for c in chunks))
        small += comm.all_reduce(cluster, tp_group, rep * sw.grad_comm_bytes)

    step = pipeline + bubble + dp_exposed + optimizer + small
    tokens = workload.tokens_per_step
    model_flops = flops_per_token(m, s) * tokens
    tflops = model_flops / step / layout.world_size
    worst = max(mems, key=lambda x: x.total)
    fits, reason = _fits(worst, cluster, layout)
    p2p_total = micro * p2p * 2 if layout.pp > 1 else 0.0
    breakdown = {
        "compute": pipeline - tp_comm - p2p_total,
        "tp_comm": tp_comm,
        "pp_bubble": bubble,
        "pp_p2p": p2p_total,
        "dp_comm_exposed": dp_exposed,
        "dp_comm_total": dp_total,
        "optimizer": optimizer,
        "small_collectives": small,
    }
    return Estimate(
        layout,
        step,
        tokens / step,
        tflops / 1e12,
        tflops / dev.peak_flops,
        worst,
        fits,
        reason,
        breakdown,
        memory_is_state=dev.kind == "cpu",
    )


_PIPELINE_ACTION_OPS = 40  # Python work per forward/backward action in torch's schedules, in op overheads


def _fits(mem: Memory, cluster: Cluster, layout: Layout) -> tuple[bool, str]:
    dev = cluster.device
    if dev.kind == "cpu":
        need = mem.total * cluster.devices_per_node
        limit = 0.9 * dev.memory_bytes
        if need <= limit:
            return True, ""
        return False, (
            f"{cluster.devices_per_node} processes x {mem.total / GiB:.2f} GiB = {need / GiB:.1f} GiB exceed 90% of "
            f"this machine's {dev.memory_bytes / GiB:.1f} GiB of RAM"
        )
    if mem.total <= dev.memory_bytes:
        return True, ""
    parts = ", ".join(
        f"{k} {v / GiB:.1f}"
        for k, v in (
            ("params", mem.params),
            ("grads", mem.grads),
            ("optimizer", mem.optimizer),
            ("activations", mem.activations),
            ("other", mem.other),
        )
    )
    hints = []
    if layout.zero < 3 and layout.dp > 1:
        hints.append(f"zero={min(3, layout.zero + 1)}")
    if layout.recompute != "full":
        hints.append("recompute=full")
    if layout.micro_batch > 1:
        hints.append("a smaller micro_batch")
    hints.append("more tp or pp, or more devices")
    return False, (
        f"needs {mem.total / GiB:.1f} GiB per device ({parts}) > {dev.memory_bytes / GiB:.1f} GiB; "
        f"try {', '.join(hints)}"
    )
