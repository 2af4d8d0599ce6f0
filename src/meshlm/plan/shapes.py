"""Which parameters and layers each rank holds, from the config alone (no model is built,
torch is not imported: the planner runs in a fraction of a second).

Mirrors meshlm exactly (tests compare both): the tensor-parallel split of
meshlm.parallel.tensor_parallel (column/row-parallel matrices, replicated norms and
row-parallel biases, the vocabulary padded to a multiple of tp), the pipeline split of
meshlm.parallel.pipeline_split.stage_layer_counts (balanced by matmul cost; stage 0 holds
the embeddings, the last stage the final norm and the output layer, a tied output layer on
another stage than its embedding has its own copy) and the stage placement of each schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from meshlm.config import ModelConfig, schedule_stages_per_rank
from meshlm.model.registry import family_spec
from meshlm.model.spec import StageCosts
from meshlm.parallel.pipeline_split import stage_ids_for_rank as pipeline_stage_ids
from meshlm.parallel.stage_balance import balanced_layer_counts
from meshlm.plan.layout import Layout, Workload


@dataclass(frozen=True)
class Chunk:
    """One pipeline stage (a "chunk" of layers) as one rank holds it."""

    stage: int
    layers: int
    has_embedding: bool
    has_output: bool


def model_key(m: ModelConfig) -> tuple:
    """The config's class and field values in order (hashable; model_from_key rebuilds it)."""
    return (type(m), *(getattr(m, f.name) for f in dataclasses.fields(m)))


def model_from_key(key: tuple) -> ModelConfig:
    return key[0](*key[1:])


def padded_vocab(m: ModelConfig, tp: int) -> int:
    return -(-m.vocab_size // tp) * tp


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layer_shapes(m: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """(rows, cols) of every parameter of one block on one tp rank (1-D parameters: (n, 1))."""
    d, hd = m.d_model, m.head_dim
    q, kv, f = m.n_heads * hd // tp, m.kv_heads * hd // tp, m.ffn_dim // tp
    shapes = [(d, 1), (q, d), (kv, d), (kv, d), (d, q), (d, 1), (f, d), (d, f)]  # norms, wq wk wv wo, norm, w1 w2
    if m.arch == "llama":
        shapes.append((f, d))  # w3
    else:
        shapes += [(d, 1), (d, 1)]  # LayerNorm biases
        shapes += [(q, 1), (kv, 1), (kv, 1), (d, 1), (f, 1), (d, 1)]  # biases of wq wk wv wo w1 w2
    return shapes


def chunk_shapes(m: ModelConfig, tp: int, chunk: Chunk, tied_copy: bool) -> list[tuple[int, int, int]]:
    """(rows, cols, multiplicity) of the parameters of one chunk on one tp rank.
    `tied_copy`: a tied output layer is its own module's copy (not shared with an embedding here)."""
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


@dataclass(frozen=True)
class ParamStats:
    numel: int
    tensors: int
    fsdp: dict  # dp shard count -> FSDP2's largest per-rank piece

    def fsdp_shard(self, n: int) -> int:
        return self.fsdp[n] if n in self.fsdp else self.numel


@functools.lru_cache(maxsize=4096)
def _chunk_stats(mkey: tuple, tp: int, chunk: Chunk, tied_copy: bool, shard_counts: tuple[int, ...]) -> tuple:
    shapes = chunk_shapes(model_from_key(mkey), tp, chunk, tied_copy)
    numel = sum(r * c * k for r, c, k in shapes)
    fsdp = tuple((n, fsdp_shard_numel(shapes, n)) for n in shard_counts)
    return numel, sum(k for _, _, k in shapes), fsdp


@functools.lru_cache(maxsize=65536)
def rank_stats(
    mkey: tuple, tp: int, chunks: tuple[Chunk, ...], pp: int, shard_counts: tuple[int, ...] = ()
) -> ParamStats:
    """Parameter count, tensor count and FSDP shard sizes of everything one rank holds
    (mkey = model_key(model config))."""
    numel = tensors = 0
    fsdp: dict[int, int] = {n: 0 for n in shard_counts}
    tied_copy = pp > 1 and (len(chunks) > 1 or not any(c.has_embedding for c in chunks))
    for c in chunks:
        n, t, f = _chunk_stats(mkey, tp, c, tied_copy, shard_counts)
        numel += n
        tensors += t
        for k, v in f:
            fsdp[k] += v
    return ParamStats(numel, tensors, fsdp)


def chunk_numel(mkey: tuple, tp: int, chunk: Chunk, tied_copy: bool) -> int:
    return _chunk_stats(mkey, tp, chunk, tied_copy, ())[0]


def fsdp_shard_numel(shapes: list[tuple[int, int, int]], n: int) -> int:
    """FSDP2 splits each parameter's first dimension into n pieces of ceil(rows / n) rows;
    rank 0 holds the largest piece (the most any rank holds)."""
    return sum(min(-(-r // n), r) * c * k for r, c, k in shapes)


@functools.lru_cache(maxsize=1024)
def _balanced_counts(mkey: tuple, n_stages: int) -> tuple[int, ...]:
    m = model_from_key(mkey)
    n_layers = m.n_layers
    costs = family_spec(m).stage_costs(m)
    embedding, block, output = costs.first, costs.blocks[0], costs.last

    def cost(stage: int, layers: int) -> int:
        return layers * block + (embedding if stage == 0 else 0) + (output if stage == n_stages - 1 else 0)

    if n_layers * n_stages > 4096:
        return _bisect_counts(n_layers, n_stages, cost, block)
    # meshlm's own split (parallel.stage_balance), step for step.
    return tuple(balanced_layer_counts(costs, n_stages))


def _bisect_counts(n_layers: int, n_stages: int, cost, block: int) -> tuple[int, ...]:
    """Large models: the same smallest maximum stage cost, found by bisection, layers then spread
    from the back so that the first stages (most activations in flight) get the fewest."""

    def fill(limit: float) -> list[int] | None:
        counts, left = [0] * n_stages, n_layers
        for s in range(n_stages - 1, -1, -1):
            k = left if s == 0 else min(left - s, int((limit - cost(s, 0)) // block))
            if k < 1 or cost(s, k) > limit:
                return None
            counts[s] = k
            left -= k
        return counts

    lo, hi = 0.0, float(cost(0, n_layers) + cost(n_stages - 1, 0))
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) else (mid, hi)
    counts = fill(hi)
    assert counts is not None
    return tuple(counts)


SPLITS = ("balanced", "even", "ends-lighter", "measured")


def stage_layer_counts(
    m: ModelConfig, n_stages: int, split: str = "balanced", costs: StageCosts | None = None
) -> tuple[int, ...]:
    """Layers per pipeline stage: meshlm's `balanced` split (the output layer counts by its matmul
    cost); `even` (Megatron: equal layers, any remainder on the first stages); `ends-lighter`
    (Llama 3: one layer fewer on the first stage, which holds the most activations, and on the
    last, which holds the output layer); `measured` (meshlm's pp_split = "measured": the same
    balance over per-block times, `costs`, as parallel.block_timing measures them)."""
    if split == "measured":
        if costs is None or len(costs.blocks) != m.n_layers:
            raise ValueError(f"the measured split needs {m.n_layers} per-block costs")
        return tuple(balanced_layer_counts(costs, n_stages))
    if split == "even" or (split == "ends-lighter" and n_stages < 3):
        base, rest = divmod(m.n_layers, n_stages)
        return tuple(base + (1 if s < rest else 0) for s in range(n_stages))
    if split == "ends-lighter":
        base, rest = divmod(m.n_layers + 2, n_stages)
        counts = [base + (1 if 0 < s <= rest else 0) for s in range(n_stages)]
        counts[0] -= 1
        counts[-1] -= 1
        if min(counts) < 1 or sum(counts) != m.n_layers:
            return stage_layer_counts(m, n_stages, "even")
        return tuple(counts)
    return _balanced_counts(model_key(m), n_stages)


def stages_per_rank(layout: Layout) -> int:
    return 1 if layout.pp == 1 else schedule_stages_per_rank(layout.schedule, layout.virtual_stages)


def stage_ids_for_rank(pp_rank: int, layout: Layout) -> list[int]:
    """The stages pipeline rank `pp_rank` holds: meshlm's own placement (one, looped, or the zbv V)."""
    return pipeline_stage_ids(pp_rank, layout.pp, layout.schedule, stages_per_rank(layout))


@functools.lru_cache(maxsize=4096)
def _rank_chunks(mkey: tuple, pp: int, schedule: str, v: int, split: str) -> tuple[tuple[Chunk, ...], ...]:
    m = model_from_key(mkey)
    layout = Layout(pp=pp, schedule=schedule, virtual_stages=v)
    total = pp * stages_per_rank(layout)
    counts = stage_layer_counts(m, total, split) if total > 1 else (m.n_layers,)
    return tuple(
        tuple(Chunk(s, counts[s], s == 0, s == total - 1) for s in stage_ids_for_rank(r, layout)) for r in range(pp)
    )


def rank_chunks(workload: Workload, layout: Layout, split: str = "balanced") -> tuple[tuple[Chunk, ...], ...]:
    """For every pipeline rank, the chunks (stages) it holds."""
    return _rank_chunks(
        model_key(workload.model),
        layout.pp,
        layout.schedule if layout.pp > 1 else "1f1b",
        layout.virtual_stages if layout.pp > 1 else 1,
        split,
    )


def replicated_tp_params(m: ModelConfig, layers: int, has_embedding: bool, has_output: bool) -> int:
    """Parameters tensor parallelism leaves replicated on a stage (the sequence-parallel gradient sync)."""
    d = m.d_model
    if m.arch == "llama":
        return (2 * layers + (1 if has_output else 0)) * d
    return (
        2 * (2 * layers + (1 if has_output else 0)) * d + 2 * layers * d + (m.max_seq_len * d if has_embedding else 0)
    )
