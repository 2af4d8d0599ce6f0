"""Compute time of one micro-batch through one pipeline chunk, kernel by kernel.

Each block is a list of kernels on one tp rank (shapes after the tensor-parallel split):

    GEMM          t = 2 M K N / (peak x gemm_efficiency) + gemm_overhead
                  forward 1 GEMM; backward 2 (input gradient dX, weight gradient dW)
    attention     FlashAttention (causal: half the 4 b s^2 d FLOPs of full attention forward,
                  backward 2.5x forward) at the device's attention rate; or materialised scores
                  (pre-FlashAttention Megatron): batched GEMMs plus the softmax / dropout
                  passes over b a s^2 / t scores, memory-bound
    elementwise   norms, rotary, activations, residual adds, casts: bytes / (HBM bandwidth x
                  efficiency) + a per-kernel overhead; counted from meshlm's code (unfused) or
                  from Megatron's fused kernels
    output + loss the vocabulary GEMM and the cross-entropy passes over b s V / t logits

Tensor-parallel collectives are on the critical path (meshlm and Megatron issue them
synchronously): per block 2 all-reduces of b s h forward and 2 backward (sequence parallel:
all-gathers + reduce-scatters of the same total traffic); full recomputation repeats the
forward ones. On a GPU the host dispatches kernels asynchronously, so a pass costs
max(device time, host time); on a CPU they are one thread and add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlm.plan import comm
from meshlm.plan.hardware import Cluster, Device
from meshlm.plan.layout import Layout, Software, Workload
from meshlm.plan.shapes import Chunk, padded_vocab


@dataclass
class PassTimes:
    """Seconds for one micro-batch through a chunk on one rank."""

    fwd: float = 0.0
    bwd_input: float = 0.0  # input-gradient backward, recomputation included
    bwd_weight: float = 0.0  # weight-gradient GEMMs
    tp_comm: float = 0.0  # part of fwd + bwd_input spent in tensor-parallel collectives
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.fwd + self.bwd_input + self.bwd_weight


class _Acc:
    """Device and host time of a sequence of kernels."""

    def __init__(self, dev: Device):
        self.dev, self.device, self.host, self.ops = dev, 0.0, 0.0, 0

    def gemm(self, M: float, K: float, N: float, count: int = 1) -> None:
        self.device += count * (2 * M * K * N / self.dev.gemm_flops + self.dev.gemm_overhead_s)
        self.host += count * self.dev.host_op_overhead_s
        self.ops += count

    def flops(self, flops: float, rate: float, ops: int = 1) -> None:
        self.device += flops / rate + ops * self.dev.op_overhead_s
        self.host += ops * self.dev.host_op_overhead_s
        self.ops += ops

    def memory(self, nbytes: float, ops: float) -> None:
        self.device += nbytes / self.dev.elementwise_bandwidth + ops * self.dev.op_overhead_s
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


def _block_elementwise(workload: Workload, layout: Layout, sw: Software) -> tuple[float, float, float, float]:
    """(forward bytes, forward kernels, backward bytes, backward kernels) of one block's
    non-GEMM, non-attention work on one tp rank."""
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    N = b * s * m.d_model / (t if layout.sequence_parallel else 1)
    Q = b * s * m.n_heads * m.head_dim / t
    K = b * s * m.kv_heads * m.head_dim / t
    F = b * s * m.ffn_dim / t
    e, er = sw.act_bytes, sw.residual_bytes
    gated = m.arch == "llama"
    if sw.fused_elementwise:
        # fused norm (r+w), fused bias-dropout-add (r x, r residual, w, + 1-byte mask), fused
        # bias-gelu / swiglu, fused rotary; attention-layout copies of q, k and the context.
        dropout_add = (3 * er + 1) if sw.attention_dropout else 3 * er
        fwd = 2 * 2 * N * er + 2 * dropout_add * N + (3 if gated else 2) * F * e
        fwd += (2 * (Q + K) * e if gated else 0) + 2 * (Q + K) * e + 2 * Q * e
        fwd_ops = 10
        bwd = 2 * fwd + 4 * N * er
        bwd_ops = 2 * fwd_ops + 2
    else:
        # meshlm (model/transformer.py), unfused: 2 norms (r+w), 2 residual adds (r r w), rotary on q and k
        # (4 muls, 2 add/sub, cat: 9 element passes), the context's contiguous copy, silu + mul (llama) or gelu.
        fwd = 2 * 2 * N * er + 2 * 3 * N * er + 2 * Q * e
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
        # backward: each forward pass roughly twice (read saved inputs and the incoming gradient,
        # write the gradient), plus the gradient sums where the residual stream and q/k/v (w1/w3) fork.
        bwd = 2 * fwd + (3 + 2 + (1 if gated else 0)) * 3 * N * er
        bwd_ops = 2 * fwd_ops + 6
    return fwd, fwd_ops, bwd, bwd_ops


def _attention(acc_f: _Acc, acc_b: _Acc, workload: Workload, layout: Layout, sw: Software, dev: Device,
               recompute_core: bool) -> None:
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    heads, hd = m.n_heads / t, m.head_dim
    e = sw.act_bytes
    if sw.attention == "flash":
        causal_fwd = 2 * b * heads * s * s * hd  # half of 4 b a s^2 hd
        acc_f.flops(causal_fwd, dev.attention_flops)
        acc_b.flops(2.5 * causal_fwd, dev.attention_flops)
        return
    scores = b * heads * s * s
    bmm = 2 * b * heads * s * s * hd  # one of the two batched GEMMs (QK^T, PV), full square

    def core_forward(acc: _Acc) -> None:
        for _ in range(2):  # each batched GEMM moves the score matrix once (write, then read)
            acc.seconds(max(bmm / dev.gemm_flops, scores * e / dev.elementwise_bandwidth) + dev.gemm_overhead_s, ops=1)
        passes = 2 + ((2 + 0.5) if sw.attention_dropout else 0)  # fused scale-mask-softmax r+w; dropout r, w, mask
        acc.memory(passes * scores * e, 2 if sw.attention_dropout else 1)

    core_forward(acc_f)
    for _ in range(4):  # dV, dP, dQ, dK
        acc_b.seconds(max(bmm / dev.gemm_flops, scores * e / dev.elementwise_bandwidth) + dev.gemm_overhead_s, ops=1)
    passes = 3 + (2.5 if sw.attention_dropout else 0)  # softmax backward r r w; dropout backward
    acc_b.memory(passes * scores * e, 2 if sw.attention_dropout else 1)
    if recompute_core:
        core_forward(acc_b)


def _tp_collectives(cluster: Cluster, layout: Layout, workload: Workload, sw: Software, layers: int,
                    chunk: Chunk) -> tuple[float, float, float]:
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
        fwd = layers * block + (rs if chunk.has_embedding else 0) + (ag if chunk.has_output else 0)
        bwd = layers * block + (ag if chunk.has_embedding else 0) + (rs if chunk.has_output else 0)
        recompute = layers * block
    else:
        ar = comm.all_reduce(cluster, group, nbytes)
        fwd = layers * 2 * ar + (ar if chunk.has_embedding else 0)
        bwd = layers * 2 * ar + (ar if chunk.has_output else 0)
        recompute = layers * 2 * ar
    if chunk.has_output:  # vocabulary-parallel cross-entropy: max and (sum-exp, target) all-reduces, float32
        fwd += comm.all_reduce(cluster, group, b * s * 4) + comm.all_reduce(cluster, group, 2 * b * s * 4)
    return fwd, bwd, recompute


def chunk_pass(workload: Workload, layout: Layout, cluster: Cluster, sw: Software, chunk: Chunk,
               chunk_params: float) -> PassTimes:
    """Times of one micro-batch through `chunk` on one rank (compute + tensor-parallel collectives)."""
    dev = cluster.device
    m = workload.model
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    M = b * s
    d, hd = m.d_model, m.head_dim
    q, kv, F = m.n_heads * hd / t, m.kv_heads * hd / t, m.ffn_dim / t
    L = chunk.layers
    fwd, bwd_in, bwd_w = _Acc(dev), _Acc(dev), _Acc(dev)

    # one block, then scaled by L
    blk_f, blk_bi, blk_bw, blk_rc = _Acc(dev), _Acc(dev), _Acc(dev), _Acc(dev)
    gemms = ([(M, d, q), (M, d, kv), (M, d, kv)] if sw.separate_qkv else [(M, d, q + 2 * kv)])
    gemms.append((M, q, d))
    gated = m.arch == "llama"
    gemms += ([(M, d, F), (M, d, F)] if sw.separate_qkv else [(M, d, 2 * F)]) if gated else [(M, d, F)]
    gemms.append((M, F, d))
    for g in gemms:
        blk_f.gemm(*g)
        blk_bi.gemm(*g)
        blk_bw.gemm(*g)
    ew_f, ops_f, ew_b, ops_b = _block_elementwise(workload, layout, sw)
    blk_f.memory(ew_f, ops_f)
    blk_bi.memory(ew_b, ops_b)
    _attention(blk_f, blk_bi, workload, layout, sw, dev, recompute_core=layout.recompute == "selective")
    if layout.recompute == "full":
        for g in gemms:
            blk_rc.gemm(*g)
        blk_rc.memory(ew_f, ops_f)
        _attention(blk_rc, _Acc(dev), workload, layout, sw, dev, recompute_core=False)

    detail = {}
    f_t, bi_t, bw_t, rc_t = (L * a.time() for a in (blk_f, blk_bi, blk_bw, blk_rc))
    detail["blocks"] = f_t + bi_t + bw_t + rc_t

    # embedding: a gather forward, a zeroed gradient and a scatter-add backward
    if chunk.has_embedding:
        vocab = padded_vocab(m, t) // t
        fwd.memory(2 * M * d * sw.residual_bytes, 2 if m.arch == "gpt2" else 1)
        bwd_in.memory(vocab * d * 4 + 2 * M * d * 4, 3)
    if chunk.has_output:
        vocab = padded_vocab(m, t) // t
        n = M * d / (t if layout.sequence_parallel else 1)
        fwd.memory(2 * n * sw.residual_bytes, 1)  # final norm
        bwd_in.memory(4 * n * sw.residual_bytes, 2)
        fwd.gemm(M, d, vocab)
        bwd_in.gemm(M, d, vocab)
        bwd_w.gemm(M, d, vocab)
        logits = M * vocab
        if dev.softmax_s_per_element:  # measured on this CPU (exp-bound, not memory-bound)
            fwd.seconds(0.4 * logits * dev.softmax_s_per_element + 3 * dev.op_overhead_s, ops=3)
            bwd_in.seconds(0.6 * logits * dev.softmax_s_per_element + 3 * dev.op_overhead_s, ops=3)
        else:
            fwd.memory(logits * sw.loss_bytes_per_logit * 0.4, 3 if t == 1 else 8)
            bwd_in.memory(logits * sw.loss_bytes_per_logit * 0.6, 3 if t == 1 else 6)
        detail["output"] = 3 * (2 * M * d * vocab / dev.gemm_flops)
    # weight casts / gradient accumulation per micro-batch
    if sw.weight_traffic_bytes:
        bwd_w.memory(chunk_params * sw.weight_traffic_bytes, 0)

    tp_f, tp_b, tp_rc = _tp_collectives(cluster, layout, workload, sw, L, chunk)
    out = PassTimes()
    out.fwd = f_t + fwd.time() + tp_f
    out.bwd_input = bi_t + rc_t + bwd_in.time() + tp_b + (tp_rc if layout.recompute == "full" else 0.0)
    out.bwd_weight = bw_t + bwd_w.time()
    out.tp_comm = tp_f + tp_b + (tp_rc if layout.recompute == "full" else 0.0)
    out.detail = detail
    return out
