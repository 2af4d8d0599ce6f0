"""ZeRO-1/2 optimizer state across layouts: each dp rank's ZeroOptimizer.state_dict() holds its
shard and the flat layout (names, shapes, offsets); `consolidate_state_dicts` joins every rank's
shards into per-parameter tensors, which `ZeroOptimizer.load_full_state` reshards for any dp size.
"""

from __future__ import annotations

from typing import Any

import torch


def normalise_layout(x: Any) -> Any:
    """Tuples and lists compare equal after a round trip through torch.save/load or JSON."""
    if isinstance(x, (list, tuple)):
        return [normalise_layout(v) for v in x]
    if isinstance(x, dict):
        return {k: normalise_layout(v) for k, v in x.items()}
    return x


def consolidate_state_dicts(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Join every dp rank's ZeroOptimizer.state_dict() into per-parameter tensors:
    {"step": int, "params": {name: {"exp_avg": Tensor(shape), "exp_avg_sq": Tensor(shape)}}}."""
    shards = sorted(shards, key=lambda sd: sd["dp_rank"])
    n = shards[0]["dp_size"]
    if [sd["dp_rank"] for sd in shards] != list(range(n)):
        raise ValueError(
            f"need one state_dict from each of the {n} dp ranks, got ranks {[sd['dp_rank'] for sd in shards]}."
        )
    out: dict[str, Any] = {"step": shards[0]["step"], "params": {}}
    for gi, layout in enumerate(shards[0]["groups"]):
        flats = {key: torch.cat([sd["groups"][gi][key] for sd in shards]) for key in ("exp_avg", "exp_avg_sq")}
        for p in layout["params"]:
            out["params"][p["name"]] = {
                key: flat[p["offset"] : p["offset"] + p["numel"]].reshape(p["shape"]).clone()
                for key, flat in flats.items()
            }
    return out
