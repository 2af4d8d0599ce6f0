"""Cutting the single-device Transformer into pipeline stages, and placing stages on ranks.

Pure functions of the config and the model: no process group is touched here, so the
split can be planned (and tested) before any process starts.

    stage_layer_counts   how many consecutive blocks each stage gets ("auto" or parallel.pp_split)
    stage_ids_for_rank   which stages a pipeline rank holds (one; looped; or the zbv "V")
    build_stage_module   a copy of the model pruned to one stage, parameter names unchanged
"""

from __future__ import annotations

import copy

from meshlm.config import Config, ConfigError, ModelConfig
from meshlm.distributed.dims import MULTI_STAGE_SCHEDULES, SCHEDULES
from meshlm.model.transformer import Transformer


def stage_costs(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embedding, one block, norm + output) costs in the unit of `stage_layer_counts`: matmul
    parameters touched per token, which is proportional to training FLOPs per token (6 per
    matmul parameter: 2 forward, 4 backward)."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    n_mlp_in = 2 if cfg.arch == "llama" else 1
    block = d * q + 2 * d * kv + q * d + (n_mlp_in + 1) * d * cfg.ffn_dim  # = model.stats per-layer matmul params
    output = cfg.vocab_size * d  # the output projection (tied or not); the final norm is negligible next to it
    embedding = d  # a gather forward and a scatter-add backward: about d per token, no matmul
    return embedding, block, output


def stage_layer_counts(cfg: Config, n_stages: int) -> list[int]:
    """Layers per pipeline stage, first to last.

    An explicit `parallel.pp_split` list is returned as given (after checking it has one
    positive entry per stage and sums to model.n_layers).

    "auto" balances compute. Costs are in matmul parameters per token (proportional to
    training FLOPs per token), see `stage_costs`:
      - each block costs its matmul parameters (attention q, k, v, o + MLP),
      - the last stage also pays for the final norm + output projection: vocab x d_model,
        as much as the projection's matmul (e.g. 1.3 blocks for tiny-cpu, 5.5 for gpt2-124m),
      - the first stage also pays for the embedding, whose forward is a gather and backward a
        scatter-add: about d_model per token, no matmul, so in practice a tie-breaker only.
    The split minimises the most expensive stage, every stage holding at least one layer. Among
    the splits reaching that minimum, the one with the smallest sum of squared stage costs (the
    most even) wins, and remaining ties give earlier stages fewer layers: in 1F1B the first
    stages keep the most micro-batches in flight, hence the most activations.
    Examples: gpt2-124m (12 layers, output = 5.5 blocks) over 4 stages -> [3, 4, 4, 1];
    6 equal layers with a small vocabulary over 4 stages -> [1, 2, 2, 1].
    """
    n_layers = cfg.model.n_layers
    split = cfg.parallel.pp_split
    if isinstance(split, list):
        if len(split) != n_stages or sum(split) != n_layers or any(n <= 0 for n in split):
            raise ConfigError(
                f"parallel.pp_split {split} must list {n_stages} positive layer counts (one per pipeline stage) "
                f"summing to model.n_layers ({n_layers})."
            )
        return list(split)
    if n_stages <= 0 or n_layers < n_stages:
        raise ConfigError(
            f"cannot split model.n_layers ({n_layers}) into {n_stages} pipeline stages of at least one layer each."
        )
    embedding, block, output = stage_costs(cfg.model)

    def cost(stage: int, layers: int) -> int:
        return layers * block + (embedding if stage == 0 else 0) + (output if stage == n_stages - 1 else 0)

    # Suffix DP over (stage, layers still to place): first the smallest possible maximum ...
    inf = float("inf")
    best_max = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    best_max[n_stages][0] = 0
    for s in range(n_stages - 1, -1, -1):
        for n in range(1, n_layers + 1):
            for k in range(1, n - (n_stages - s - 1) + 1):
                best_max[s][n] = min(best_max[s][n], max(cost(s, k), best_max[s + 1][n - k]))
    limit = best_max[0][n_layers]
    # ... then, under that maximum, the most even split (smallest sum of squared costs).
    best_sq = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    best_sq[n_stages][0] = 0
    for s in range(n_stages - 1, -1, -1):
        for n in range(1, n_layers + 1):
            for k in range(1, n - (n_stages - s - 1) + 1):
                if cost(s, k) <= limit:
                    best_sq[s][n] = min(best_sq[s][n], cost(s, k) ** 2 + best_sq[s + 1][n - k])
    counts, left = [], n_layers
    for s in range(n_stages):  # smallest k reaching the optimum: earlier stages get fewer layers on ties
        k = next(k for k in range(1, left - (n_stages - s - 1) + 1)
                 if cost(s, k) <= limit and cost(s, k) ** 2 + best_sq[s + 1][left - k] == best_sq[s][left])
        counts.append(k)
        left -= k
    return counts


def stage_ids_for_rank(pp_rank: int, pp: int, schedule: str, stages_per_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, ascending.

    gpipe, 1f1b: one stage, [pp_rank].
    interleaved-1f1b, interleaved-zero-bubble: looped, [r, r + pp, r + 2 pp, ...].
    zbv: the V, [r, 2 pp - 1 - r]: rank 0 holds the first and the last stage.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, {pp})")
    if schedule not in MULTI_STAGE_SCHEDULES:
        if stages_per_rank != 1:
            raise ValueError(f"the {schedule} schedule runs one stage per rank, got stages_per_rank={stages_per_rank}")
        return [pp_rank]
    if schedule == "zbv":
        if stages_per_rank != 2:
            raise ValueError(f"the zbv schedule runs exactly 2 stages per rank, got stages_per_rank={stages_per_rank}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def stage_pp_rank(stage_id: int, pp: int, schedule: str, stages_per_rank: int) -> int:
    """The pipeline rank that holds `stage_id` (the inverse of `stage_ids_for_rank`)."""
    for r in range(pp):
        if stage_id in stage_ids_for_rank(r, pp, schedule, stages_per_rank):
            return r
    raise ValueError(f"stage {stage_id} does not exist with pp={pp} and {stages_per_rank} stages per rank")


def stage_layer_range(stage_id: int, layer_counts: list[int]) -> range:
    """The (global) layer indices of a stage."""
    start = sum(layer_counts[:stage_id])
    return range(start, start + layer_counts[stage_id])


def build_stage_module(model: Transformer, stage_id: int, n_stages: int, layer_counts: list[int]) -> Transformer:
    """A deep copy of `model` keeping only what stage `stage_id` runs.

    The blocks keep their original keys (stage 1 of [2, 2] holds layers "2" and "3"), so
    parameter names, checkpoints and optimizer state line up with the single-device model.
    tok_embeddings / pos_embeddings live on stage 0 only, norm / output on the last stage only;
    Transformer.forward then takes and returns hidden states (B, T, d) in between.

    Tied embeddings split over two stages: the last stage's output.weight becomes its own copy
    (equal values), no longer shared with tok_embeddings; the two copies' gradients must be
    summed after every backward (pipeline.TiedEmbeddingSync). A single stage (n_stages == 1)
    keeps the tie. The dropped parts are never copied, so the peak memory is one stage.
    """
    if len(layer_counts) != n_stages or not 0 <= stage_id < n_stages:
        raise ValueError(f"stage {stage_id} of {n_stages} with layer counts {layer_counts}")
    if sum(layer_counts) != len(model.layers):
        raise ValueError(f"layer counts {layer_counts} do not sum to the model's {len(model.layers)} layers")
    keep = {str(i) for i in stage_layer_range(stage_id, layer_counts)}
    dropped = [block for name, block in model.layers.items() if name not in keep]
    if stage_id != 0:
        dropped += [m for m in (model.tok_embeddings, model.pos_embeddings) if m is not None]
    if stage_id != n_stages - 1:
        dropped += [m for m in (model.norm, model.output) if m is not None]
    # deepcopy returns what the memo holds for an object it has seen: the dropped modules become
    # None without being copied. A parameter shared with a dropped module (the tied output weight
    # on the last stage) is itself not in the memo, so it is copied: the stage owns its copy.
    stage = copy.deepcopy(model, memo={id(m): None for m in dropped})
    for name in [name for name, block in stage.layers.items() if block is None]:
        del stage.layers[name]
    return stage
