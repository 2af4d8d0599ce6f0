"""Compute time of one micro-batch through one pipeline chunk, kernel by kernel.

Each block is a list of kernels on one tp rank (shapes after the tensor-parallel split):

    GEMM          t = 2 M K N / (peak x gemm_efficiency) + gemm_overhead
                  forward 1 GEMM; backward 2 (input gradient dX, weight gradient dW)
    attention     FlashAttention (causal: half the 4 b s^2 d FLOPs of full attention forward,
                  all of them with model.causal = false; backward 2.5x forward) at the device's attention rate; or materialised scores
                  (pre-FlashAttention Megatron): batched GEMMs plus the softmax / dropout
                  passes over b a s^2 / t scores, memory-bound
    elementwise   norms, rotary, activations, residual adds, casts: bytes / (HBM bandwidth x
                  efficiency) + a per-kernel overhead; counted from meshlm's code (unfused) or
                  from Megatron's fused kernels
    output + loss the vocabulary GEMM and the cross-entropy passes over b s V / t logits

Tensor-parallel collectives: per block 2 all-reduces of b s h forward and 2 backward (sequence
parallel: all-gathers + reduce-scatters of the same total traffic); full recomputation repeats
the forward ones. meshlm and Megatron-LM 2021-22 issue them synchronously (on the critical path);
Megatron-Core pipelines them with the GEMMs (tp_overlap.py: what stays exposed, and the compute
the overlap costs). On a GPU the host dispatches kernels asynchronously, so a pass costs
max(device time, host time); on a CPU they are one thread and add up.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.plan import comm
from meshlm.plan.hardware import Cluster, Device
from meshlm.plan.layout import Layout, Software, Workload
from meshlm.plan.shapes import Chunk, padded_vocab
from meshlm.plan.tp_overlap import block_tp


@dataclass
class PassTimes:
    """Seconds for one micro-batch through a chunk on one rank."""

    fwd: float = 0.0
    bwd_input: float = 0.0  # input-gradient backward, recomputation included
    bwd_weight: float = 0.0  # weight-gradient GEMMs
    tp_fwd: float = 0.0  # part of fwd spent in tensor-parallel collectives
    tp_bwd: float = 0.0  # part of bwd_input spent in tensor-parallel collectives
    tp_hidden: float = 0.0  # tensor-parallel communication overlapped with GEMMs (not in the times above)

    @property
    def total(self) -> float:
        return self.fwd + self.bwd_input + self.bwd_weight

    @property
    def tp_comm(self) -> float:
        return self.tp_fwd + self.tp_bwd

    def slowed(self, factor: float, p2p_in: float = 0.0, p2p_out: float = 0.0) -> PassTimes:
        """Compute `factor` times slower (processes sharing cores), collectives as they are, plus
        the pipeline's receive before the forward and send after the backward."""
        return PassTimes(
            (self.fwd - self.tp_fwd) * factor + self.tp_fwd + p2p_in,
            (self.bwd_input - self.tp_bwd) * factor + self.tp_bwd + p2p_out,
            self.bwd_weight * factor,
            self.tp_fwd,
            self.tp_bwd,
            self.tp_hidden,
        )


class _Acc:
    """Device and host time of a sequence of kernels."""

    def __init__(self, dev: Device):
        self.dev, self.device, self.host, self.ops = dev, 0.0, 0.0, 0

    def gemm(self, M: float, K: float, N: float, count: int = 1) -> None:
        self.device += count * (2 * M * K * N / self.dev.gemm_flops + self.dev.gemm_overhead_s)
        self.host += count * self.dev.host_op_overhead_s
        self.ops += count

    def memory(self, nbytes: float, ops: float, reduce_bytes: float = 0.0) -> None:
        """Memory-bound kernels: `nbytes` streamed (elementwise) and `reduce_bytes` through
        row reductions (norms, softmax, bias gradients), which reach less of the bandwidth."""
        self.device += (
            nbytes / self.dev.elementwise_bandwidth
            + reduce_bytes / self.dev.reduction_bandwidth
            + ops * self.dev.op_overhead_s
        )
        self.host += ops * self.dev.host_op_overhead_s
        self.ops += ops

    def seconds(self, s: float, ops: int = 0) -> None:
        """`s` seconds of device time (overheads included by the caller) issued as `ops` kernels."""
        self.device += s
        self.host += ops * self.dev.host_op_overhead_s
        self.ops += ops

    def time(self) -> float:
        if self.dev.kind == "cpu":
            return self.device  # one thread: every op's dispatch is already in its measured cost
        return max(self.device, self.host)


@dataclass
class Elementwise:
    """One block's memory-bound work on one tp rank, in bytes and kernels."""

    fwd: float
    fwd_reduce: float
    fwd_ops: float
    bwd: float
    bwd_reduce: float
    bwd_ops: float


def block_elementwise(workload: Workload, layout: Layout, sw: Software) -> Elementwise:
    """The non-GEMM, non-attention work of one block: streamed bytes (activations, residual adds,
    casts, rotary) and reduced bytes (norms, their backward with the gain gradients, bias gradients)."""
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    N = b * s * m.d_model / (t if layout.sequence_parallel else 1)
    Q = b * s * m.n_heads * m.head_dim / t
    K = b * s * m.kv_heads * m.head_dim / t
    F = b * s * m.ffn_dim / t
    e, er = sw.act_bytes, sw.residual_bytes
    gated = m.arch == "llama"
    norms_fwd = 2 * 2 * N * er  # two norms: read x, write y
    norms_bwd = 2 * 5 * N * er  # read x and dy, write dx; the gain (and bias) gradient: read x and dy again
    bias_grads = 0.0 if gated else ((Q + 2 * K) + N + F + N) * e  # column sums of the output gradients (gpt2)
    if sw.fused_elementwise:
        # Megatron's fused kernels: bias-dropout-add (r x, r residual, w out, w 1-byte mask),
        # bias-gelu / swiglu, rotary; the attention-layout copies of q, k and the context.
        dropout_add = (3 * er + 1) if sw.attention_dropout else 3 * er
        fwd = 2 * dropout_add * N + (3 if gated else 2) * F * e + (2 * (Q + K) * e if gated else 0)
        fwd += 2 * (Q + K) * e + 2 * Q * e
        fwd_ops = 10
        bwd, bwd_ops = 2 * fwd + 2 * 3 * N * er, 2 * fwd_ops + 2
    else:
        # meshlm (model/transformer.py), unfused: 2 residual adds (r r w), rotary on q and k (4 muls,
        # 2 add/sub, cat: 9 element passes), the context's contiguous copy, silu + mul (llama) or gelu.
        fwd = 2 * 3 * N * er + 2 * Q * e
        fwd_ops = 5
        if gated:
            fwd += 9 * (Q + K) * e + (2 + 3) * F * e
            fwd_ops += 14 + 2
        else:
            fwd += 2 * F * e
            fwd_ops += 1
        if e != er:  # autocast: the two norm outputs are cast to bf16 for the linear layers
            fwd += 2 * N * (er + e)
            fwd_ops += 2
        # backward: each forward pass about twice (read the saved input and the incoming gradient,
        # write the gradient), plus the gradient sums where the residual stream and q/k/v (w1/w3) fork.
        bwd = 2 * fwd + (3 + 2 + (1 if gated else 0)) * 3 * N * er
        bwd_ops = 2 * fwd_ops + 6
        if layout.sequence_parallel and t > 1 and b > 1:
            # meshlm's (B, T, d) layout: each sequence-parallel all-gather / reduce-scatter moves the
            # rank axis in front of the batch, one copy of the full (B, T, d) tensor (tp_collectives)
            full = b * s * m.d_model * e
            fwd, bwd = fwd + 4 * 2 * full, bwd + 4 * 2 * full
            fwd_ops, bwd_ops = fwd_ops + 4, bwd_ops + 4
    return Elementwise(fwd, norms_fwd, fwd_ops, bwd, norms_bwd + bias_grads, bwd_ops + (0 if gated else 6))


def _attention(
    acc_f: _Acc, acc_b: _Acc, workload: Workload, layout: Layout, sw: Software, dev: Device, recompute_core: bool
) -> None:
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    heads, hd = m.n_heads / t, m.head_dim
    e = sw.act_bytes
    if sw.attention == "flash":
        # causal: half of 4 b a s^2 hd (the kernel skips the masked tiles); non-causal all of it
        work_fwd = (2 if getattr(m, "causal", True) else 4) * b * heads * s * s * hd
        rows = b * heads * s * dev.attention_row_s  # per query row: loads, statistics, diagonal tiles
        acc_f.seconds(work_fwd / dev.attention_flops + rows / 3.5 + dev.op_overhead_s, 1)
        acc_b.seconds(2.5 * work_fwd / dev.attention_flops + rows * 2.5 / 3.5 + dev.op_overhead_s, 1)
        return
    scores = b * heads * s * s
    bmm = 2 * b * heads * s * s * hd  # one of the two batched GEMMs (QK^T, PV), full square

    def core_forward(acc: _Acc) -> None:
        for _ in range(2):  # each batched GEMM moves the score matrix once (write, then read)
            acc.seconds(max(bmm / dev.gemm_flops, scores * e / dev.elementwise_bandwidth) + dev.gemm_overhead_s, ops=1)
        dropout = 2.5 if sw.attention_dropout else 0  # dropout: read, write, 1-byte mask
        acc.memory(
            dropout * scores * e, 2 if sw.attention_dropout else 1, 2 * scores * e
        )  # fused scale-mask-softmax r+w

    core_forward(acc_f)
    for _ in range(4):  # dV, dP, dQ, dK
        acc_b.seconds(max(bmm / dev.gemm_flops, scores * e / dev.elementwise_bandwidth) + dev.gemm_overhead_s, ops=1)
    dropout = 2.5 if sw.attention_dropout else 0  # dropout backward: read gradient and mask, write
    acc_b.memory(dropout * scores * e, 2 if sw.attention_dropout else 1, 3 * scores * e)  # softmax backward r r w
    if recompute_core:
        core_forward(acc_b)


def _tp_collectives(
    cluster: Cluster,
    layout: Layout,
    workload: Workload,
    sw: Software,
    layers: int,
    has_embedding: bool,
    has_output: bool,
) -> tuple[float, float, float]:
    """(forward, backward, recompute) seconds of tensor-parallel collectives for one micro-batch
    (the table in meshlm.parallel.tensor_parallel's docstring)."""
    if layout.tp == 1:
        return 0.0, 0.0, 0.0
    group = comm.place_group(cluster, layout.tp, 1)
    b, s = layout.micro_batch, workload.seq_len
    nbytes = b * s * workload.model.d_model * sw.act_bytes
    if layout.sequence_parallel:
        ag = comm.all_gather(cluster, group, nbytes)
        rs = comm.reduce_scatter(cluster, group, nbytes)
        block = 2 * ag + 2 * rs
        fwd = layers * block + (rs if has_embedding else 0) + (ag if has_output else 0)
        bwd = layers * block + (ag if has_embedding else 0) + (rs if has_output else 0)
        recompute = layers * block
    else:
        ar = comm.all_reduce(cluster, group, nbytes)
        fwd = layers * 2 * ar + (ar if has_embedding else 0)
        bwd = layers * 2 * ar + (ar if has_output else 0)
        recompute = layers * 2 * ar
    if has_output:  # vocabulary-parallel cross-entropy: max and (sum-exp, target) all-reduces, float32
        fwd += comm.all_reduce(cluster, group, b * s * 4) + comm.all_reduce(cluster, group, 2 * b * s * 4)
    return fwd, bwd, recompute


def block_pass(workload: Workload, layout: Layout, cluster: Cluster, sw: Software) -> PassTimes:
    """One transformer block, one micro-batch, one tp rank: GEMMs, attention, elementwise work,
    recomputation and the block's tensor-parallel collectives."""
    dev = cluster.device
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    M = b * s
    d, hd = m.d_model, m.head_dim
    q, kv, F = m.n_heads * hd / t, m.kv_heads * hd / t, m.ffn_dim / t
    f, bi, bw, rc = _Acc(dev), _Acc(dev), _Acc(dev), _Acc(dev)
    sites = {  # the tensor-parallel GEMM sites and their GEMMs
        "qkv": [(M, d, q), (M, d, kv), (M, d, kv)] if sw.separate_qkv else [(M, d, q + 2 * kv)],
        "proj": [(M, q, d)],
        "fc1": ([(M, d, F), (M, d, F)] if sw.separate_qkv else [(M, d, 2 * F)]) if m.arch == "llama" else [(M, d, F)],
        "fc2": [(M, F, d)],
    }
    gemms = [g for site in sites.values() for g in site]
    for g in gemms:
        f.gemm(*g)
        bi.gemm(*g)
        bw.gemm(*g)
    ew = block_elementwise(workload, layout, sw)
    f.memory(ew.fwd, ew.fwd_ops, ew.fwd_reduce)
    bi.memory(ew.bwd, ew.bwd_ops, ew.bwd_reduce)
    _attention(f, bi, workload, layout, sw, dev, recompute_core=layout.recompute == "selective")
    if layout.recompute == "full":
        for g in gemms:
            rc.gemm(*g)
        rc.memory(ew.fwd, ew.fwd_ops, ew.fwd_reduce)
        _attention(rc, _Acc(dev), workload, layout, sw, dev, recompute_core=False)
    site_s = {k: sum(2 * a * b_ * c / dev.gemm_flops + dev.gemm_overhead_s for a, b_, c in v) for k, v in sites.items()}
    tp = block_tp(cluster, layout, workload, sw, site_s)
    again = layout.recompute == "full"  # full recomputation repeats the forward's collectives
    tp_b = tp.bwd + (tp.fwd if again else 0.0)
    if tp.split_gemms:  # the pipelined sites' GEMMs run as tp chunks: each chunk pays the per-GEMM cost
        f.seconds(tp.split_gemms[0] * dev.gemm_overhead_s)
        bi.seconds(tp.split_gemms[1] * dev.gemm_overhead_s)
        if again:
            rc.seconds(tp.split_gemms[0] * dev.gemm_overhead_s)
    # overlapped collectives slow the compute beside them (comm.overlap_cost)
    k = comm.overlap_cost(cluster, comm.place_group(cluster, layout.tp, 1))
    f.seconds(k * tp.fwd_hidden)
    bi.seconds(k * (tp.bwd_hidden + (tp.fwd_hidden if again else 0.0)))
    hidden = tp.fwd_hidden * (2 if again else 1) + tp.bwd_hidden
    return PassTimes(f.time() + tp.fwd, bi.time() + rc.time() + tp_b, bw.time(), tp.fwd, tp_b, hidden)


def ends_pass(
    workload: Workload, layout: Layout, cluster: Cluster, sw: Software, has_embedding: bool, has_output: bool
) -> PassTimes:
    """The embedding (stage 0) and the final norm, output layer and loss (last stage)."""
    dev = cluster.device
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    M, d = b * s, m.d_model
    f, bi, bw = _Acc(dev), _Acc(dev), _Acc(dev)
    vocab = padded_vocab(m, t) // t
    if has_embedding:  # a gather forward; backward zeroes the (vocab, d) gradient and scatter-adds
        f.memory(2 * M * d * sw.residual_bytes, 2 if m.arch == "gpt2" else 1)
        bi.memory(vocab * d * 4 + 2 * M * d * 4, 3)
    if has_output:
        n = M * d / (t if layout.sequence_parallel else 1)
        f.memory(0, 1, 2 * n * sw.residual_bytes)  # final norm
        bi.memory(0, 2, 5 * n * sw.residual_bytes)
        f.gemm(M, d, vocab)
        bi.gemm(M, d, vocab)
        bw.gemm(M, d, vocab)
        logits = M * vocab
        if dev.softmax_s_per_element:  # measured on this CPU (exp-bound, not memory-bound)
            f.seconds(0.4 * logits * dev.softmax_s_per_element + 3 * dev.op_overhead_s, ops=3)
            bi.seconds(0.6 * logits * dev.softmax_s_per_element + 3 * dev.op_overhead_s, ops=3)
        else:
            f.memory(0, 3 if t == 1 else 8, logits * sw.loss_bytes_per_logit * 0.4)
            bi.memory(0, 3 if t == 1 else 6, logits * sw.loss_bytes_per_logit * 0.6)
    tp_f, tp_b, _ = _tp_collectives(cluster, layout, workload, sw, 0, has_embedding, has_output)
    return PassTimes(f.time() + tp_f, bi.time() + tp_b, bw.time(), tp_f, tp_b)


def weight_traffic(cluster: Cluster, sw: Software, params: float) -> float:
    """Per micro-batch: autocast's weight casts and the gradient accumulation into .grad."""
    if not sw.weight_traffic_bytes:
        return 0.0
    return params * sw.weight_traffic_bytes / cluster.device.elementwise_bandwidth


def chunk_pass(
    workload: Workload, layout: Layout, cluster: Cluster, sw: Software, chunk: Chunk, chunk_params: float
) -> PassTimes:
    """One micro-batch through `chunk` on one rank (compute + tensor-parallel collectives)."""
    blk = block_pass(workload, layout, cluster, sw)
    ends = ends_pass(workload, layout, cluster, sw, chunk.has_embedding, chunk.has_output)
    L = chunk.layers
    return PassTimes(
        L * blk.fwd + ends.fwd,
        L * blk.bwd_input + ends.bwd_input,
        L * blk.bwd_weight + ends.bwd_weight + weight_traffic(cluster, sw, chunk_params),
        L * blk.tp_fwd + ends.tp_fwd,
        L * blk.tp_bwd + ends.tp_bwd,
        L * blk.tp_hidden,
    )
