"""A family's tensor-parallel plan (data in its FamilySpec) turned into answers about names:
which style a module has, and along which dimension each parameter is split.

The same rules serve applying tensor parallelism, gathering and sharding state dicts,
checkpoints (which slice of the global tensor a rank holds) and gradient norms (which
gradients are replicated over the tp group)."""

from __future__ import annotations

import re

from meshlm.config import ModelConfig
from meshlm.model.registry import family_spec
from meshlm.model.spec import ShardStyle, TensorParallelPlan
from meshlm.parallel.wrappers import clean_name


def _pattern(path: str) -> re.Pattern:
    return re.compile("^" + r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in path.split(".")) + "$")


class ShardRules:
    def __init__(self, plan: TensorParallelPlan | None):
        self.plan = plan
        self._styles = [(_pattern(p), style) for p, style in (plan.styles.items() if plan else ())]
        self._regions = [_pattern(p) for p in (plan.regions if plan else ())]

    def style(self, module_path: str) -> ShardStyle | None:
        path = clean_name(module_path)
        return next((style for pattern, style in self._styles if pattern.match(path)), None)

    def is_region(self, module_path: str) -> bool:
        path = clean_name(module_path)
        return any(pattern.match(path) for pattern in self._regions)

    def shard_dim(self, fqn: str) -> int | None:
        """The dimension along which a parameter of the single-device model is split under TP:
        0 for column-parallel weights and biases and the vocabulary rows, 1 for row-parallel
        weights, -1 (the last) for `vocab_columns` tables, None for replicated ones (norms,
        row-parallel biases, position embeddings)."""
        module, _, param = clean_name(fqn).rpartition(".")
        style = self.style(module)
        if style in ("column", "vocab_embedding", "vocab_output"):
            return 0
        if style == "vocab_columns":
            return -1
        if style == "row" and param == "weight":
            return 1
        return None

    def is_vocab(self, fqn: str) -> bool:
        """A parameter whose rows (or, for `vocab_columns`, last dimension) are the vocabulary,
        padded to a multiple of tp when split along its shard dimension."""
        module, _, _ = clean_name(fqn).rpartition(".")
        return self.style(module) in ("vocab_embedding", "vocab_output", "vocab_columns")


def shard_rules(cfg: ModelConfig) -> ShardRules:
    return ShardRules(family_spec(cfg).tp_plan(cfg))
