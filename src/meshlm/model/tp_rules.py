"""Whether a layout can split the model, in one place: the family's declared capabilities and
its divisibility rule (heads, widths).

The launcher's layout check (`parallel_dims_from_config`), `apply_tensor_parallel`, the
inference commands' `--tp` and the planner all ask this module, so a layout that passes the
pre-launch check never fails inside the workers, and the planner never proposes one that would.
"""

from __future__ import annotations

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import family_spec


def layout_problem(cfg: ModelConfig, tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> str | None:
    """Why the model's family cannot run this layout (None when it can)."""
    spec = family_spec(cfg)
    refusal = spec.capabilities.refusal(spec.name, tp, sequence_parallel, pp)
    if refusal:
        return refusal
    return spec.tp_problem(cfg, tp) if tp > 1 else None


def tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    return layout_problem(cfg, tp=tp)


def check_tp_divides(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError (naming the keys and the degrees that would work) unless tp splits the model."""
    problem = tp_problem(cfg, tp)
    if problem:
        raise ConfigError(problem)


def check_layout_supported(cfg: ModelConfig, tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> None:
    problem = layout_problem(cfg, tp, pp, sequence_parallel)
    if problem:
        raise ConfigError(problem)
