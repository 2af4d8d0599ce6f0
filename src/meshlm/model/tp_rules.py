"""What tensor parallelism needs of the model, in one place.

The launcher's layout check (`parallel_dims_from_config`), `apply_tensor_parallel`, the
inference commands' `--tp` and the planner all ask this module, so a layout that passes the
pre-launch check never fails inside the workers, and the planner never proposes one that would.
"""

from __future__ import annotations

import math

from meshlm.config import ConfigError, ModelConfig


def tp_divisors(cfg: ModelConfig) -> list[int]:
    """Every tensor-parallel degree the model can be split over: the common divisors of the
    attention heads, the key/value heads and the MLP hidden size."""
    g = math.gcd(cfg.n_heads, cfg.kv_heads, cfg.ffn_dim)
    return [d for d in range(1, g + 1) if g % d == 0]


def tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    """Why the model cannot be split over `tp` ranks (None when it can)."""
    if tp <= 1:
        return None
    bad = []
    if cfg.n_heads % tp:
        bad.append(f"model.n_heads ({cfg.n_heads})")
    if cfg.kv_heads % tp:
        bad.append(f"model.n_kv_heads ({cfg.kv_heads})")
    if cfg.ffn_dim % tp:
        default = "" if cfg.ffn_hidden else ", the default for this d_model"
        bad.append(f"the MLP hidden size model.ffn_hidden ({cfg.ffn_dim}{default})")
    if not bad:
        return None
    verb = "is" if len(bad) == 1 else "are"
    fix = f"Use tp among {', '.join(map(str, tp_divisors(cfg)))}"
    if cfg.ffn_dim % tp:
        fix += f", or set model.ffn_hidden to a multiple of {tp} (e.g. {tp * -(-cfg.ffn_dim // tp)})"
    return (
        f"tensor parallelism splits the attention heads and the MLP over tp={tp} ranks, but "
        f"{', '.join(bad)} {verb} not divisible by {tp}. {fix}."
    )


def check_tp_divides(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError (naming the keys and the degrees that would work) unless tp splits the model."""
    problem = tp_problem(cfg, tp)
    if problem:
        raise ConfigError(problem)
