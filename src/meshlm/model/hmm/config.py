"""The hmm family's [model] keys. No torch import (the registry loads every family's config
section cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import ConfigError, ModelConfig, check_positive


@dataclass
class HMMConfig(ModelConfig):
    # Hidden states S: the model has S initial, S x S transition and S x V emission probabilities.
    n_states: int = 64
    # Standard deviation of the random initial logits (random, so that the states differ).
    init_std: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_positive({"model.n_states": self.n_states})
        if self.init_std < 0:
            raise ConfigError(f"'model.init_std' must be zero or positive, got {self.init_std}.")
