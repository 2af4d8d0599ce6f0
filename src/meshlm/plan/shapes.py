"""Which parameters and layers each rank holds, from the config alone (no model is built).

Mirrors meshlm exactly: the tensor-parallel split of meshlm.parallel.tensor_parallel
(column/row-parallel matrices, replicated norms and row-parallel biases, the vocabulary
padded to a multiple of tp), the pipeline split of meshlm.parallel.pipeline_split (stage 0
holds the embeddings, the last stage the final norm and the output layer, a tied output
layer split from its embedding gets its own copy), and the stage placement of each schedule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from meshlm.config import Config, ModelConfig
from meshlm.plan.layout import Layout, Workload


@dataclass(frozen=True)
class Chunk:
    """One pipeline stage (a "chunk" of layers) as one rank holds it."""

    stage: int
    layers: int
    has_embedding: bool
    has_output: bool


def padded_vocab(m: ModelConfig, tp: int) -> int:
    return -(-m.vocab_size // tp) * tp


def layer_shapes(m: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """(rows, cols) of every parameter of one block on one tp rank (1-D parameters: (n, 1))."""
    d, hd = m.d_model, m.head_dim
    q, kv, f = m.n_heads * hd // tp, m.kv_heads * hd // tp, m.ffn_dim // tp
    gpt2 = m.arch == "gpt2"
    shapes = [(d, 1), (q, d), (kv, d), (kv, d), (d, q), (d, 1), (f, d), (d, f)]  # norms, wq wk wv wo, norm, w1 w2
    if not gpt2:
        shapes.append((f, d))  # w3
    else:
        shapes += [(d, 1), (d, 1)]  # LayerNorm biases
        shapes += [(q, 1), (kv, 1), (kv, 1), (d, 1), (f, 1), (d, 1)]  # biases of wq wk wv wo w1 w2
    return shapes


def chunk_shapes(m: ModelConfig, tp: int, chunk: Chunk, tied_copy: bool) -> list[tuple[int, int, int]]:
    """(rows, cols, multiplicity) of the parameters of one chunk on one tp rank.
    `tied_copy`: the output layer is tied to an embedding on another stage (its own copy)."""
    d, v = m.d_model, padded_vocab(m, tp) // tp
    out = [(r, c, chunk.layers) for r, c in layer_shapes(m, tp)]
    if chunk.has_embedding:
        out.append((v, d, 1))
        if m.arch == "gpt2":
            out.append((m.max_seq_len, d, 1))
    if chunk.has_output:
        out.append((d, 1, 1))
        if m.arch == "gpt2":
            out.append((d, 1, 1))
        if not m.tied or not chunk.has_embedding or tied_copy:
            out.append((v, d, 1))
    return out


def numel(shapes: list[tuple[int, int, int]]) -> int:
    return sum(r * c * k for r, c, k in shapes)


def fsdp_shard_numel(shapes: list[tuple[int, int, int]], n: int) -> int:
    """FSDP2 splits each parameter's first dimension into n pieces of ceil(rows / n) rows;
    rank 0 holds the largest piece (the most a rank holds)."""
    return sum(min(-(-r // n), r) * c * k for r, c, k in shapes)


def block_matmul_params(m: ModelConfig) -> int:
    d, hd = m.d_model, m.head_dim
    q, kv = m.n_heads * hd, m.kv_heads * hd
    return d * q + 2 * d * kv + q * d + (3 if m.arch == "llama" else 2) * d * m.ffn_dim


@functools.lru_cache(maxsize=512)
def _stage_counts(model_fields: tuple, n_stages: int) -> tuple[int, ...]:
    m = ModelConfig(*model_fields)
    if m.n_layers <= 64:  # meshlm's own split (a dynamic program: exact, fast enough for small L)
        from meshlm.parallel.pipeline_split import stage_layer_counts as meshlm_split

        return tuple(meshlm_split(Config(model=m), n_stages))
    # Large models: the same min-max objective (largest stage cost), by bisection.
    from meshlm.parallel.pipeline_split import stage_costs

    embedding, block, output = stage_costs(m)

    def fits(limit: float) -> list[int] | None:
        counts, left = [], m.n_layers
        for s in range(n_stages):
            extra = (embedding if s == 0 else 0) + (output if s == n_stages - 1 else 0)
            k = left if s == n_stages - 1 else min(left - (n_stages - s - 1), int((limit - extra) // block))
            if k < 1 or k * block + extra > limit:
                return None
            counts.append(k)
            left -= k
        return counts

    lo, hi = 0.0, float(m.n_layers * block + embedding + output)
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return tuple(fits(hi))


def stage_layer_counts(m: ModelConfig, n_stages: int, even: bool = False) -> tuple[int, ...]:
    """Layers per pipeline stage: meshlm's balanced split (the output layer counts as its matmul
    cost), or `even` (Megatron: equal layers, the remainder on the first stages)."""
    if even:
        base, rest = divmod(m.n_layers, n_stages)
        return tuple(base + (1 if s < rest else 0) for s in range(n_stages))
    import dataclasses

    return _stage_counts(dataclasses.astuple(m), n_stages)


def stages_for_rank(pp_rank: int, layout: Layout) -> list[int]:
    from meshlm.parallel.pipeline_split import stage_ids_for_rank

    if layout.pp == 1:
        return [0]
    v = layout.virtual_stages if layout.schedule in ("interleaved-1f1b", "interleaved-zero-bubble", "zbv") else 1
    return stage_ids_for_rank(pp_rank, layout.pp, layout.schedule, v)


def n_stages(layout: Layout) -> int:
    if layout.pp == 1:
        return 1
    v = layout.virtual_stages if layout.schedule in ("interleaved-1f1b", "interleaved-zero-bubble", "zbv") else 1
    return layout.pp * v


def rank_chunks(workload: Workload, layout: Layout, even_split: bool = False) -> list[list[Chunk]]:
    """For every pipeline rank, the chunks (stages) it holds."""
    m = workload.model
    s_total = n_stages(layout)
    counts = stage_layer_counts(m, s_total, even_split) if s_total > 1 else (m.n_layers,)
    out = []
    for r in range(layout.pp):
        out.append([Chunk(s, counts[s], s == 0, s == s_total - 1) for s in stages_for_rank(r, layout)])
    return out


def rank_param_shapes(workload: Workload, layout: Layout, chunks: list[Chunk]) -> list[tuple[int, int, int]]:
    """All parameters one rank holds (its chunks, on its tp rank)."""
    m = workload.model
    has_emb = any(c.has_embedding for c in chunks)
    shapes = []
    for c in chunks:
        # a tied output layer on a rank that also holds the embedding shares it (zbv rank 0
        # holds both stages but as two modules: each module has its own copy)
        tied_copy = layout.pp > 1 and (not has_emb or len(chunks) > 1)
        shapes += chunk_shapes(m, layout.tp, c, tied_copy)
    return shapes


def replicated_tp_params(m: ModelConfig, layers: int, has_embedding: bool, has_output: bool) -> int:
    """Parameters that tensor parallelism leaves replicated on a stage (sequence-parallel grad sync)."""
    d = m.d_model
    if m.arch == "llama":
        return (2 * layers + (1 if has_output else 0)) * d
    return 2 * (2 * layers + (1 if has_output else 0)) * d + 2 * layers * d + (m.max_seq_len * d if has_embedding else 0)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


