"""The LSTM family's [model] keys. No torch import: the registry loads every family's config
section cheaply, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import ConfigError, ModelConfig, check_positive


@dataclass
class LSTMConfig(ModelConfig):
    # Token embedding size (word_language_model's `emsize`).
    d_embed: int = 128
    # Hidden (and cell) size of every LSTM layer (`nhid`).
    d_hidden: int = 128
    # Stacked LSTM layers: each one a block (pipeline stage unit, FSDP unit, checkpointing unit).
    n_layers: int = 2
    # Dropout on the embedding and on every layer's output (0 in the tiny and parity configs).
    dropout: float = 0.0
    # Share the output matrix with the embedding (Press & Wolf 2017; Inan et al. 2017). When
    # d_hidden differs from d_embed a d_hidden -> d_embed projection precedes the output layer.
    tie_embeddings: bool = True
    # Embedding and output weights ~ U(-init_range, init_range) (the example's 0.1); the LSTM
    # weights keep PyTorch's U(-1/sqrt(d_hidden), 1/sqrt(d_hidden)).
    init_range: float = 0.1
    # Each layer also runs a second LSTM from the end of the row to its start and adds its
    # output to the forward one, so a position sees the tokens after it too: a tagger's backbone
    # option (`meshlm finetune --set model.bidirectional=true`), never a language model's (it
    # cannot generate, and pretraining it would be trivial: each position sees its target). The
    # sum keeps every width, so a pretrained unidirectional run loads; the backward LSTMs start
    # from their initialisation.
    bidirectional: bool = False

    RIGHT_CONTEXT = ("bidirectional", True)
    # At the transformer's 1e-3 a pretrained 2x192 LSTM tagged the built-in NER set to span F1
    # 0.849 after one epoch, at 1e-2 to 0.971 (docs/benchmarks.md, "Fine-tuning learning rate").
    FINETUNE_LR = 1e-2

    @property
    def tied(self) -> bool:
        return self.tie_embeddings

    @property
    def has_projection(self) -> bool:
        return self.tie_embeddings and self.d_hidden != self.d_embed

    @property
    def d_output_in(self) -> int:
        """Features the output layer reads: the embedding size when tied, else the hidden size."""
        return self.d_embed if self.tie_embeddings else self.d_hidden

    def layer_input(self, i: int) -> int:
        return self.d_embed if i == 0 else self.d_hidden

    def validate(self) -> None:
        super().validate()
        check_positive(
            {"model.d_embed": self.d_embed, "model.d_hidden": self.d_hidden, "model.n_layers": self.n_layers}
        )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'model.dropout' must be in [0, 1), got {self.dropout}; 0 switches dropout off.")
        if self.init_range <= 0:
            raise ConfigError(f"'model.init_range' must be positive, got {self.init_range} (the example uses 0.1).")
