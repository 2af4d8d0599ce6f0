"""Balancing blocks over pipeline stages: the cost of a stage and the split that minimises the
most expensive one. Pure arithmetic on per-block costs (no torch import), shared by the
pipeline splitter and the planner; the costs come from the model family's spec
(`FamilySpec.stage_costs`), so uneven blocks balance as well as even ones."""

from __future__ import annotations

from meshlm.model.spec import StageCosts


def balanced_layer_counts(costs: StageCosts, n_stages: int) -> list[int]:
    """Consecutive blocks per stage minimising the most expensive stage (each >= 1 block); among
    those splits the most even (smallest sum of squared stage costs); remaining ties give earlier
    stages fewer blocks. The first stage also pays `costs.first`, the last `costs.last`."""
    blocks = costs.blocks
    n_layers = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, start: int, k: int) -> float:
        work = prefix[start + k] - prefix[start]
        return work + (costs.first if stage == 0 else 0) + (costs.last if stage == n_stages - 1 else 0)

    # Suffix DP over (stage, blocks already placed): first the smallest possible maximum ...
    inf = float("inf")
    best_max = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    best_max[n_stages][n_layers] = 0
    for s in range(n_stages - 1, -1, -1):
        for start in range(n_layers):
            for k in range(1, n_layers - start - (n_stages - s - 1) + 1):
                best_max[s][start] = min(best_max[s][start], max(cost(s, start, k), best_max[s + 1][start + k]))
    limit = best_max[0][0]
    # ... then, under that maximum, the most even split (smallest sum of squared costs).
    best_sq = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    best_sq[n_stages][n_layers] = 0
    for s in range(n_stages - 1, -1, -1):
        for start in range(n_layers):
            for k in range(1, n_layers - start - (n_stages - s - 1) + 1):
                c = cost(s, start, k)
                if c <= limit:
                    best_sq[s][start] = min(best_sq[s][start], c**2 + best_sq[s + 1][start + k])
    counts, start = [], 0
    for s in range(n_stages):  # smallest k reaching the optimum: earlier stages get fewer blocks on ties
        k = next(
            k
            for k in range(1, n_layers - start - (n_stages - s - 1) + 1)
            if cost(s, start, k) <= limit and cost(s, start, k) ** 2 + best_sq[s + 1][start + k] == best_sq[s][start]
        )
        counts.append(k)
        start += k
    return counts
