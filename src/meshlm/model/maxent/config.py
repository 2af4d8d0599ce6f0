"""The maxent family's [model] keys. No torch import (the registry loads every family's config
section cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import ConfigError, ModelConfig, check_positive


@dataclass
class MaxEntConfig(ModelConfig):
    # n of the n-gram: features for the histories of 1 .. order-1 previous tokens (plus the
    # unigram bias). order = 3 is a trigram model.
    order: int = 3
    # Rows of each history length's hashed feature table; each row holds one weight per
    # vocabulary entry, so a table has hash_rows x vocab_size weights.
    hash_rows: int = 2048
    # Standard deviation of the initial weights; 0 starts at zero (the convex problem's usual start).
    init_std: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_positive({"model.order": self.order, "model.hash_rows": self.hash_rows})
        if self.order < 2:
            raise ConfigError(
                f"'model.order' is {self.order}, but a maxent model needs at least one history feature: "
                f"set model.order >= 2 (2 = bigram features, 3 = trigram, ...)."
            )
        if self.init_std < 0:
            raise ConfigError(f"'model.init_std' must be zero or positive, got {self.init_std}.")
