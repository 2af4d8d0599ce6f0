"""Tensor-parallel communication of one block beside its GEMMs: what stays on the critical path.

A block has four tensor-parallel GEMM sites (shapes after the split, M = b s tokens):
QKV and FC1 are column-parallel (their input is gathered / their input gradient reduced),
the attention projection and FC2 row-parallel (their output reduced / their output gradient
gathered). c is one collective of the b s h activation, g the GEMM beside it (the dgrad and
wgrad GEMMs of a layer have its forward GEMM's size), t = tp.

    software "none" (meshlm: synchronous collectives; the table of meshlm.parallel.tensor_parallel)
        forward 4 collectives, backward 4, all exposed.
    software "backward" (Megatron-LM since 2022, LinearWithGradAccumulationAndAsyncCommunication):
        the forward's collectives and the row-parallel layers' backward all-gathers are synchronous;
        a column-parallel layer's backward re-gathers its input (sequence parallel) beside the dgrad
        GEMM and reduces its input gradient beside the wgrad GEMM: exposed max(0, c - g) each.
    software "pipelined" (Megatron-Core --tp-comm-overlap, Transformer Engine userbuffers; sequence
        parallel only, otherwise as "backward"): every all-gather + GEMM and GEMM + reduce-scatter is
        split into t chunks; chunk i's GEMM runs while chunk i + 1 travels:
            all-gather -> GEMM      exposed max(0, c - g (t - 1) / t)    (the first chunk is local)
            GEMM -> reduce-scatter  exposed max(c / t, c - g (t - 1) / t) (the last chunk's transfer)
        the column-parallel backward as "backward" (bulk overlap with dgrad and wgrad).

Overlapped communication is not free: its hidden part is returned too, so that the caller can
charge the compute slowed by the communication kernels running beside it (cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.plan import comm
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Software, Workload


@dataclass
class BlockTP:
    """Seconds of one block's tensor-parallel communication on the critical path, one micro-batch."""

    fwd: float = 0.0
    bwd: float = 0.0
    fwd_hidden: float = 0.0  # overlapped with GEMMs (forward; repeated by full recomputation)
    bwd_hidden: float = 0.0
    split_gemms: tuple[int, int] = (0, 0)  # extra GEMM launches (forward, backward) from splitting into chunks


def _hide(c: float, g: float) -> float:
    """Exposed part of a collective issued asynchronously beside a GEMM of g seconds."""
    return max(0.0, c - g)


def block_tp(cluster: Cluster, layout: Layout, workload: Workload, sw: Software, gemm: dict[str, float]) -> BlockTP:
    """`gemm`: forward seconds of the GEMM sites "qkv", "proj", "fc1", "fc2" on one tp rank."""
    t = layout.tp
    if t == 1:
        return BlockTP()
    group = comm.place_group(cluster, t, 1)
    b, s = layout.micro_batch, workload.seq_len
    nbytes = b * s * workload.model.d_model * sw.act_bytes
    mode = sw.tp_overlap
    if not layout.sequence_parallel:
        ar = comm.all_reduce(cluster, group, nbytes)
        if mode == "none":
            return BlockTP(2 * ar, 2 * ar)
        # the input gradients of QKV and FC1 are all-reduced beside their wgrad GEMMs
        bwd = _hide(ar, gemm["qkv"]) + _hide(ar, gemm["fc1"])
        return BlockTP(2 * ar, bwd, 0.0, 2 * ar - bwd)
    ag = comm.all_gather(cluster, group, nbytes)
    rs = comm.reduce_scatter(cluster, group, nbytes)
    if mode == "none":
        return BlockTP(2 * (ag + rs), 2 * (ag + rs))
    # column-parallel backward (QKV, FC1): re-gather the input beside dgrad, reduce-scatter dX beside wgrad
    col_bwd = sum(_hide(ag, gemm[k]) + _hide(rs, gemm[k]) for k in ("qkv", "fc1"))
    col_all = 2 * (ag + rs)
    if mode == "backward":
        return BlockTP(2 * (ag + rs), 2 * ag + col_bwd, 0.0, col_all - col_bwd)
    share = (t - 1) / t

    def ag_gemm(g: float) -> float:
        return max(0.0, ag - g * share)

    def gemm_rs(g: float) -> float:
        return max(rs / t, rs - g * share)

    fwd = ag_gemm(gemm["qkv"]) + gemm_rs(gemm["proj"]) + ag_gemm(gemm["fc1"]) + gemm_rs(gemm["fc2"])
    row_bwd = ag_gemm(gemm["proj"]) + ag_gemm(gemm["fc2"])  # all-gather dY, pipelined with the dgrad GEMM
    bwd = row_bwd + col_bwd
    # four forward sites and the two row-parallel dgrad GEMMs run as t chunks each
    return BlockTP(fwd, bwd, 2 * (ag + rs) - fwd, 2 * ag + col_all - bwd, (4 * (t - 1), 2 * (t - 1)))
