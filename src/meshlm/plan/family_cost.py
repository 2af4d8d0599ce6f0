"""Layouts and their cost for a model the detailed attention-block model does not describe (a
gated CNN, an LSTM, a log-linear or hidden-Markov model, ...), from its family spec alone.

    compute per micro-batch   on cpu-local, the family's own model timed here (forward, loss,
                              backward, one thread) at the layout's micro-batch; on an accelerator,
                              the spec's FLOPs per token at the GEMM rate plus the activations'
                              memory traffic. Split over pipeline stages by the spec's StageCosts,
                              over tp ranks by each part's share of the parameters a rank holds
    tensor parallel           the all-reduces of the plan's regions and vocabulary-parallel
                              reductions, counted on the model itself (family_shapes.py)
    pipeline                  1F1B: m micro-batches x the slowest stage + (p - 1) x its pass,
                              a block's input sent each way per micro-batch and boundary
    data parallel             DDP buckets / ZeRO-1/2 reduce-scatter + all-gather / FSDP2 per
                              block, as for the block model (comm.py), not overlapped on the CPU
    optimizer, memory         as the block model (memory.state_bytes, the software's bytes per
                              parameter); activations: what autograd keeps, counted on meta tensors

Only the layouts the family's Capabilities allow are enumerated (model/tp_rules.py), so the
planner never proposes one it cannot run. What is not modelled for these families: interleaved
and zero-bubble schedules, sequence parallelism's own costs, activation recomputation's memory
(only its time); docs/planner.md says how close the rest comes.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator

from meshlm.model.registry import family_spec
from meshlm.model.spec import submodule
from meshlm.model.stats import flops_per_token
from meshlm.model.tp_rules import layout_problem
from meshlm.parallel.stage_balance import balanced_layer_counts
from meshlm.plan import comm
from meshlm.plan.cost import Estimate, _fits
from meshlm.plan.family_shapes import Inventory, inventory
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Software, Workload
from meshlm.plan.memory import shard_count, state_bytes
from meshlm.plan.shapes import ParamStats, fsdp_shard_numel, model_from_key, model_key

MAX_MICRO_BATCH = 64


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(workload: Workload, cluster: Cluster, sw: Software, rejected: dict) -> Iterator[Layout]:
    m = workload.model
    world = cluster.world_size
    n_blocks = family_spec(m).n_blocks(m)

    def reject(why: str) -> None:
        rejected[why] = rejected.get(why, 0) + 1

    for tp in _divisors(world):
        if tp > cluster.devices_per_node:
            reject("tp larger than a node")
            continue
        if layout_problem(m, tp=tp):
            reject("the family cannot split this tp")
            continue
        for pp in _divisors(world // tp):
            if pp > 1 and layout_problem(m, pp=pp):
                reject("the family has no pipeline")
                continue
            if pp > n_blocks:
                reject("pp larger than the blocks")
                continue
            dp = world // (tp * pp)
            if workload.global_batch % dp:
                reject("dp does not divide the global batch")
                continue
            local = workload.global_batch // dp
            for mb in _divisors(local):
                if mb > MAX_MICRO_BATCH:
                    continue
                if pp > 1 and local // mb < pp:
                    reject("fewer micro-batches than pipeline stages")
                    continue
                for z in [z for z in (0, 1, 2, 3) if z <= sw.max_zero] if dp > 1 else (0,):
                    for rc in ("none", "full"):
                        yield Layout(dp, tp, pp, z, mb, rc, False, "1f1b", 1, 1)


@functools.lru_cache(maxsize=512)
def _measured_pass(mkey: tuple, seq_len: int, micro_batch: int, dtype: str) -> tuple[float, tuple[float, ...]]:
    """(seconds, shares) of one forward + loss + backward of the whole model on one micro-batch,
    on this machine with one thread (as each training rank runs), the best of 2-6 tries; shares:
    each part's (first, blocks, last + loss) share of the forward's wall time, timed by hooks at
    the blocks' boundaries (the backward is taken to follow the forward part by part)."""
    import torch

    from meshlm.model.loss import lm_loss
    from meshlm.model.registry import build_model

    m = model_from_key(mkey)
    spec = family_spec(m)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(m, "cpu", seed=0)
        if dtype != "float32":
            model = model.to(getattr(torch, dtype))
        blocks = submodule(model, spec.blocks)
        names = list(blocks.keys()) if blocks is not None else []
        marks: list[tuple[int, float]] = []
        hooks = [
            blocks[b].register_forward_pre_hook(lambda *_, i=i: marks.append((1 + i, time.perf_counter())))
            for i, b in enumerate(names)
        ]
        if names:
            hooks.append(
                blocks[names[-1]].register_forward_hook(lambda *_: marks.append((len(names) + 1, time.perf_counter())))
            )
        x = torch.randint(0, m.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
        lm_loss(model(x), x).backward()  # warm-up (allocations, first-call work)
        best, spent, runs, shares = math.inf, 0.0, 0, ()
        while runs < 2 or (runs < 6 and spent < 1.0):  # a shared machine: more tries when they are cheap
            marks.clear()
            start = time.perf_counter()
            loss = lm_loss(model(x), x)
            forward_end = time.perf_counter()
            loss.backward()
            took = time.perf_counter() - start
            if took < best:
                parts = [0.0] * (len(names) + 2)
                edges = [(0, start), *marks, (None, forward_end)]
                for (part, t0), (_, t1) in zip(edges, edges[1:]):
                    parts[part] += t1 - t0
                total = sum(parts) or 1.0
                best, shares = took, tuple(p / total for p in parts)
            spent, runs = spent + took, runs + 1
        for h in hooks:
            h.remove()
        return best, shares
    finally:
        torch.set_num_threads(threads)


def _pass_time(
    workload: Workload, layout: Layout, cluster: Cluster, sw: Software, inv: Inventory
) -> tuple[float, tuple[float, ...]]:
    """One micro-batch through the whole model on one device (before any split), and each
    part's share of it: measured on cpu-local, the spec's StageCosts elsewhere."""
    m, b, s = workload.model, layout.micro_batch, workload.seq_len
    dev = cluster.device
    if dev.kind == "cpu":
        return _measured_pass(model_key(m), s, b, sw.dtype)
    flops = flops_per_token(m, s, True) * b * s
    traffic = 3 * sum(inv.activations) * b * sw.act_bytes / 4  # written forward, read twice backward
    total = sum(inv.costs) or 1.0
    return flops / dev.gemm_flops + traffic / dev.elementwise_bandwidth, tuple(c / total for c in inv.costs)


def _stages(inv: Inventory, pp: int) -> list[list[int]]:
    """The parts (0 first, 1..n blocks, n+1 last) each pipeline stage holds: meshlm's balanced split."""
    n = len(inv.costs) - 2
    if pp == 1:
        return [list(range(n + 2))]
    from meshlm.model.spec import StageCosts

    counts = balanced_layer_counts(StageCosts(inv.costs[0], list(inv.costs[1:-1]), inv.costs[-1]), pp)
    stages, start = [], 1
    for i, c in enumerate(counts):
        parts = list(range(start, start + c))
        start += c
        stages.append(([0] if i == 0 else []) + parts + ([n + 1] if i == pp - 1 else []))
    return stages


def estimate_family(workload: Workload, layout: Layout, cluster: Cluster, sw: Software) -> Estimate:
    m = workload.model
    dev = cluster.device
    mkey = model_key(m)
    s, b = workload.seq_len, layout.micro_batch
    micro = layout.microbatches(workload.global_batch)
    inv = inventory(mkey, s, layout.tp)
    whole, weight = _pass_time(workload, layout, cluster, sw, inv)
    stages = _stages(inv, layout.pp)
    tp_group = comm.place_group(cluster, layout.tp, 1)
    dp_group = comm.place_group(cluster, layout.dp, layout.tp)
    pp_group = comm.place_group(cluster, layout.pp, layout.tp * layout.dp)
    n_blocks = len(inv.costs) - 2

    stage_times, stage_compute, stage_tp, mems, stats = [], [], [], [], []
    p2p = 0.0
    if layout.pp > 1:
        p2p = comm.send_recv(cluster, pp_group.crosses_nodes, inv.block_input * b * sw.residual_bytes)
    for i, parts in enumerate(stages):
        share = sum(weight[k] * inv.compute_share(k) for k in parts)
        compute = whole * share
        if layout.recompute == "full":  # checkpointed blocks run their forward again (~1/3 of a pass)
            compute += whole * sum(weight[k] * inv.compute_share(k) for k in parts if 0 < k <= n_blocks) / 3
        stage_share = sum(weight[k] for k in parts)
        tp_time = (
            comm.all_reduce(
                cluster,
                tp_group,
                inv.tp_allreduce * b * stage_share * sw.act_bytes / max(1, inv.tp_allreduces),
                round(inv.tp_allreduces * stage_share),
            )
            if layout.tp > 1
            else 0.0
        )
        hops = (i > 0) + (i < len(stages) - 1)
        stage_times.append(compute + tp_time + 2 * hops * p2p)
        stage_compute.append(compute)
        stage_tp.append(tp_time)
        numel = sum(inv.numel[k] for k in parts)
        shapes = [(r, c, 1) for k in parts for r, c in inv.shapes[k]]
        n_shard = shard_count(layout)
        st = ParamStats(numel, sum(inv.tensors[k] for k in parts), {n_shard: fsdp_shard_numel(shapes, n_shard)})
        stats.append(st)
        mem = state_bytes(st, layout, sw)
        in_flight = min(micro, layout.pp - i) if layout.pp > 1 else 1
        acts = sum(inv.activations[k] for k in parts) * b * sw.act_bytes / 4
        if layout.recompute == "full":
            acts = sum(inv.activations[k] for k in parts if not 0 < k <= n_blocks) * b * sw.act_bytes / 4
            acts += sum(1 for k in parts if 0 < k <= n_blocks) * inv.block_input * b * sw.residual_bytes
        mem.activations = acts * in_flight
        mem.other = 0.0 if dev.kind == "cpu" else dev.reserve_bytes
        mems.append(mem)

    slowest = max(range(len(stages)), key=lambda i: stage_times[i])
    pipeline = micro * stage_times[slowest]
    bubble = (layout.pp - 1) * stage_times[slowest] if layout.pp > 1 else 0.0
    if dev.kind == "cpu" and dev.cores and layout.world_size > dev.cores:
        # N processes on C < N cores: compute is conserved (as in cost.estimate)
        work = layout.dp * layout.tp * micro * sum(stage_compute)
        path = micro * stage_compute[slowest] + (layout.pp - 1) * stage_compute[slowest]
        pipeline += max(0.0, work / dev.cores - path)

    heavy = max(range(len(stats)), key=lambda i: stats[i].numel)
    st = stats[heavy]
    P = st.numel
    dp_total = 0.0
    if layout.dp > 1:
        grad_bytes, bucket = P * sw.grad_comm_bytes, sw.dp_bucket_bytes(layout.dp)
        if layout.zero == 0:
            dp_total = comm.bucketed_all_reduce(cluster, dp_group, grad_bytes, bucket)
        elif layout.zero in (1, 2):
            dp_total = comm.bucketed_half(cluster, dp_group, grad_bytes, bucket, "reduce_scatter")
            dp_total += comm.bucketed_half(cluster, dp_group, P * sw.param_comm_bytes, bucket, "all_gather")
        else:
            units = sum(1 for k in stages[heavy] if 0 < k <= n_blocks) + 1
            ag = comm.all_gather(cluster, dp_group, P * sw.param_comm_bytes / units, units)
            dp_total = micro * 2 * ag + comm.reduce_scatter(cluster, dp_group, grad_bytes / units, units)
    overlap = dev.kind != "cpu" and (sw.dp_overlap if layout.pp == 1 else sw.pp_dp_overlap)
    last_backward = stage_compute[heavy] * 2 / 3
    dp_exposed = max(0.0, dp_total - last_backward) if overlap else dp_total

    opt_elems = P if layout.zero == 0 or layout.dp == 1 else math.ceil(P / shard_count(layout))
    optimizer = opt_elems * sw.optimizer_bytes_per_param / dev.elementwise_bandwidth
    optimizer += st.tensors * sw.optimizer_ops_per_tensor * (dev.op_overhead_s if dev.kind == "cpu" else 0.0)
    if dev.kind == "cpu" and dev.cores and layout.world_size > dev.cores:
        optimizer *= layout.world_size / dev.cores
    small = comm.all_reduce(cluster, comm.place_group(cluster, layout.world_size, 1), 4)
    small += comm.all_reduce(cluster, dp_group, 4)
    if layout.pp > 1:
        small += comm.all_reduce(cluster, pp_group, 4)

    step = pipeline + bubble + dp_exposed + optimizer + small
    tokens = workload.tokens_per_step
    tflops = flops_per_token(m, s) * tokens / step / layout.world_size
    worst = max(mems, key=lambda x: x.total)
    fits, reason = _fits(worst, cluster, layout)
    tp_comm = micro * stage_tp[slowest]
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
