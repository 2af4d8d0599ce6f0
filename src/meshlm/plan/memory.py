"""Memory per device: model state by ZeRO stage, activations by recomputation policy and
pipeline schedule, the vocabulary layers' logits, sharding buffers and a framework reserve.

Model state (P = parameters this rank holds after the tp and pp splits, N = dp shard count,
S = ceil(P / N); bytes per element from the Software profile: param p, grad g, master w,
Adam moments o):

    zero 0   P (p + g + w + o)
    zero 1   P (p + g) + S (w + o)          meshlm: one flat buffer of N S elements for p and g
    zero 2   P p + S (g + w + o)
    zero 3   shard (p + g + w + o), shard = FSDP2's largest per-rank piece (rows padded per parameter)

For meshlm these are exactly what the trainer reports in state_bytes.json (tests check it).

Activations per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"), s = sequence, b = micro-batch, h = hidden,
a = heads, t = tp, 16-bit activations:

    no recompute          s b h (10 + 24 / t + 5 a s / (h t))     (sequence parallel: s b h (34 / t + 5 a s / (h t)))
    selective recompute   the 5 a s / (h t) term (attention scores) dropped
    full recompute        2 s b h (/ t with sequence parallel): the layer input only

generalised here to gated MLPs, grouped-query attention, no dropout masks and FlashAttention
(no score term). For meshlm the saved tensors are counted from its code instead (see
`layer_activation_bytes`). Pipeline: the first stage of 1F1B keeps min(m, p) micro-batches
in flight, GPipe all m, interleaved schedules p (1 + (p - 1) / (p v)).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import LOOPED_SCHEDULES
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Software, Workload
from meshlm.plan.shapes import Chunk, ParamStats, ceil_div, padded_vocab


@dataclass
class Memory:
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    other: float = 0.0  # logits and loss, sharding buffers, framework reserve

    @property
    def state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.activations + self.other


def shard_count(layout: Layout) -> int:
    """Ranks the model state is sharded over (ZeRO-1/2: dp; FSDP: dp / dp_replicate)."""
    return layout.dp // layout.dp_replicate if layout.zero == 3 else layout.dp


def state_bytes(stats: ParamStats, layout: Layout, sw: Software) -> Memory:
    P = stats.numel
    n = shard_count(layout)
    mem = Memory()
    if layout.zero == 0 or layout.dp == 1:
        mem.params, mem.grads, mem.optimizer = (
            P * sw.param_bytes,
            P * sw.grad_bytes,
            P * (sw.master_bytes + sw.optimizer_bytes),
        )
    elif layout.zero in (1, 2):
        S = ceil_div(P, n)
        padded = n * S  # meshlm's flat buffers are padded to N S elements
        mem.params = padded * sw.param_bytes
        mem.grads = padded * sw.grad_bytes if layout.zero == 1 else S * sw.grad_bytes
        mem.optimizer = S * (sw.master_bytes + sw.optimizer_bytes)
    else:
        shard = stats.fsdp_shard(n)
        mem.params, mem.grads, mem.optimizer = (
            shard * sw.param_bytes,
            shard * sw.grad_bytes,
            shard * (sw.master_bytes + sw.optimizer_bytes),
        )
    return mem


def layer_activation_bytes(workload: Workload, layout: Layout, sw: Software, recompute: str | None = None) -> float:
    """Bytes one block keeps for its backward, per micro-batch, on one tp rank."""
    m = workload.model
    recompute = recompute or layout.recompute
    b, s, t = layout.micro_batch, workload.seq_len, layout.tp
    sp = layout.sequence_parallel
    N = b * s * m.d_model / (t if sp else 1)  # residual-stream elements held by this rank
    Q = b * s * m.n_heads * m.head_dim / t
    K = b * s * m.kv_heads * m.head_dim / t
    F = b * s * m.ffn_dim / t
    heads = m.n_heads / t
    gated = m.arch == "llama"
    if recompute == "full":
        return N * sw.residual_bytes
    e, er = sw.act_bytes, sw.residual_bytes
    if sw.activation_model == "megatron":
        # Korthikanti's 34 s b h, term by term: layer-norm inputs 2N, QKV input N, Q K V, the
        # projection input, MLP input N, MLP activations (fc1 output and GELU output: 2 F; gated,
        # Megatron-Core's fused SwiGLU keeps the fc1 output, 2 F, and its result: 3 F), dropout
        # masks (1 byte each).
        masks = 2 * N if sw.attention_dropout else 0
        elems = 4 * N + 2 * Q + 2 * K + (3 if gated else 2) * F
        total = e * elems + masks
    else:
        # meshlm, counted from model/transformer.py: per block the two norm inputs (residual dtype) and
        # outputs (float32 under autocast, plus the bf16 copy the linear layers keep), q k v, the rotary
        # outputs (llama), the attention output and its contiguous copy (wo's input), the MLP's
        # activations (llama: w1, w3, silu, product; gpt2: w1, gelu).
        norm = 2 * N * (er + 4 + (e if e != 4 else 0))
        attn = e * ((Q + 2 * K) + (Q + K if gated else 0) + 2 * Q)
        mlp = e * (4 if gated else 2) * F
        total = norm + attn + mlp
    if sw.attention == "materialized" and recompute != "selective":
        scores = b * heads * s * s
        total += scores * (2 * e + (1 + e if sw.attention_dropout else 0))  # softmax out (+ dropout mask and out)
    elif sw.attention == "flash":
        total += b * heads * s * 4  # log-sum-exp statistics
    return total


def in_flight(layout: Layout, microbatches: int, pp_rank: int) -> float:
    """Micro-batches whose activations rank `pp_rank` holds at its peak, in units of all its layers."""
    p, m = layout.pp, microbatches
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    warm = min(m, p - pp_rank)
    if layout.schedule in LOOPED_SCHEDULES:
        v = layout.virtual_stages
        return min(float(m), warm * (1 + (p - 1) / (p * v)))
    if layout.schedule == "zbv":
        return float(min(m, p))  # the V keeps rank 0's two stages' share about level with 1F1B's first stage
    return float(warm)


def rank_memory(
    workload: Workload,
    layout: Layout,
    cluster: Cluster,
    sw: Software,
    chunks: tuple[Chunk, ...],
    stats: ParamStats,
    pp_rank: int,
    per_layer: tuple[float, float] | None = None,
) -> Memory:
    """Memory of pipeline rank `pp_rank` holding `chunks`. per_layer: (bytes kept per layer and
    micro-batch, bytes of one layer without recomputation), when the caller has them."""
    m = workload.model
    mem = state_bytes(stats, layout, sw)
    layers = sum(c.layers for c in chunks)
    micro = layout.microbatches(workload.global_batch)
    if per_layer is None:
        per_layer = (layer_activation_bytes(workload, layout, sw), layer_activation_bytes(workload, layout, sw, "none"))
    acts = in_flight(layout, micro, pp_rank) * layers * per_layer[0]
    if layout.recompute == "full" and layers:
        acts += per_layer[1]  # backward re-runs one block at a time: its full activations exist once
    mem.activations = acts
    b, s = layout.micro_batch, workload.seq_len
    other = 0.0
    if any(c.has_output for c in chunks):
        vocab = padded_vocab(m, layout.tp) // layout.tp
        other += b * s * vocab * (sw.act_bytes + 4 + 4)  # logits, float32 copy, log-probabilities
    if layout.zero == 3 and layout.dp > 1 and layers:
        block = stats.numel / max(layers, 1)
        other += block * (2 * sw.param_bytes + sw.grad_bytes)  # two unsharded blocks (prefetch) + one block's grads
    if layout.zero in (1, 2) and layout.dp > 1:
        other += min(sw.bucket_bytes, stats.numel * sw.grad_bytes) * 2  # reduce-scatter / all-gather staging
    if cluster.device.kind == "gpu":
        other += cluster.device.reserve_bytes
    mem.other = other
    return mem
