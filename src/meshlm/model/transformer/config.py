"""The transformer family's [model] keys (llama and gpt2 variants). No torch import: the
registry loads every family's config section cheaply, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshlm.config import ConfigError, ModelConfig, check_non_negative, check_positive


@dataclass
class TransformerConfig(ModelConfig):
    arch: Literal["llama", "gpt2"] = "llama"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    # Key/value heads for grouped-query attention; 0 means "same as n_heads".
    n_kv_heads: int = 0
    # Hidden size of the MLP; 0 picks the variant's default
    # (gpt2: 4 * d_model; llama: 8/3 * d_model rounded up to `ffn_multiple_of`).
    ffn_hidden: int = 0
    ffn_multiple_of: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # gpt2 always ties the output layer to the token embedding; llama may.
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Causal attention: position t attends to positions <= t, what a language model needs
    # (training predicts t+1 from them; generation appends tokens left to right). false: every
    # position attends to the whole row (as BERT does), for a tagger that should see the words
    # after a token too; fine-tuning only (`meshlm finetune --set model.causal=false`), since such
    # a model cannot generate, and pretraining it would be trivial (each position sees its target).
    causal: bool = True

    RIGHT_CONTEXT = ("causal", False)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" or self.tie_embeddings

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.arch == "gpt2":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def validate(self) -> None:
        super().validate()
        check_positive({"model.d_model": self.d_model, "model.n_layers": self.n_layers, "model.n_heads": self.n_heads})
        check_non_negative({"model.n_kv_heads": self.n_kv_heads, "model.ffn_hidden": self.ffn_hidden})
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"'model.d_model' ({self.d_model}) must be divisible by 'model.n_heads' ({self.n_heads}); "
                f"pick d_model as a multiple of n_heads."
            )
        if self.head_dim % 2 and self.arch == "llama":
            raise ConfigError(
                f"rotary embeddings need an even head size, but d_model / n_heads = {self.head_dim}; "
                f"change 'model.d_model' or 'model.n_heads'."
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"'model.n_heads' ({self.n_heads}) must be divisible by 'model.n_kv_heads' ({self.kv_heads}) "
                f"for grouped-query attention."
            )
        if self.arch == "gpt2" and self.n_kv_heads not in (0, self.n_heads):
            raise ConfigError(
                f"'model.n_kv_heads' ({self.n_kv_heads}) is a llama option; gpt2 uses full multi-head attention. "
                f'Set it to 0 or use model.arch="llama".'
            )
