"""Parameter count and FLOPs per token of any model, from its config alone (the family's spec
knows the formulas): what the trainer logs, its MFU and the run header use."""

from __future__ import annotations

from meshlm.config import ModelConfig
from meshlm.model.registry import family_spec


def count_params(cfg: ModelConfig) -> int:
    return family_spec(cfg).count_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    return family_spec(cfg).flops_per_token(cfg, seq_len, training)
