"""Balancing layers over pipeline stages: the cost of a stage and the split that minimises the
most expensive one. Pure arithmetic on the model config (no torch import), shared by the
pipeline splitter and the planner."""

from __future__ import annotations

from meshlm.config import ModelConfig


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


def balanced_layer_counts(model: ModelConfig, n_stages: int) -> list[int]:
    """Layers per stage minimising the most expensive stage (each >= 1 layer); among those
    splits the most even (smallest sum of squared stage costs); remaining ties give earlier
    stages fewer layers. See pipeline_split.stage_layer_counts for the cost model."""
    n_layers = model.n_layers
    embedding, block, output = stage_costs(model)

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
        k = next(
            k
            for k in range(1, left - (n_stages - s - 1) + 1)
            if cost(s, k) <= limit and cost(s, k) ** 2 + best_sq[s + 1][left - k] == best_sq[s][left]
        )
        counts.append(k)
        left -= k
    return counts
