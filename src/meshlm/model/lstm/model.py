"""An LSTM language model on one device, as PyTorch's word_language_model example (and
AWD-LSTM without its regularisation tricks: no weight drop, no variational dropout).

This file knows nothing about processes, ranks or meshes; parallelism is applied from outside
(meshlm.parallel) through the family spec, so the module layout is part of the contract:

    embedding   nn.Embedding(vocab, d_embed)              (None on later pipeline stages)
    layers      nn.ModuleDict {"0": LSTMBlock, ...}       one single-layer nn.LSTM each: the unit
                                                          of pipeline cuts, FSDP and checkpointing
      .lstm             nn.LSTM(d_in, d_hidden)           left to right
      .reverse_lstm     nn.LSTM(d_in, d_hidden) or None   right to left, only with
                                                          model.bidirectional (its output is
                                                          added to .lstm's: widths unchanged)
    proj        nn.Linear(d_hidden, d_embed) or None      only when tied and the sizes differ
    output      nn.Linear(d_embed or d_hidden, vocab)     (None on earlier pipeline stages)

Why one nn.LSTM per layer and not one multi-layer nn.LSTM: each layer is then a block the
pipeline can cut between (micro-batches flow through the layers as a wavefront, layer l on
micro-batch i while layer l+1 takes micro-batch i-1), FSDP can shard and checkpointing can
recompute. On CPU a multi-layer nn.LSTM runs its layers one after the other over the whole
sequence anyway, so the split costs nothing (measured: benchmarks/lstm_reference.py). On a GPU
cuDNN's multi-layer call can overlap layer l+1's early steps with layer l's later ones, which a
split gives up; not measured here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.lstm.config import LSTMConfig


class _DenseGradient(torch.autograd.Function):
    """Identity forward; backward returns the gradient contiguous. nn.LSTM(batch_first=True)
    works on a transposed (T, B, d) view of its input, so the gradient of a (B, T, d) input comes
    back transposed; a pipeline stage sends that gradient to the previous stage, whose receive
    buffer is dense."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class LSTMBlock(nn.Module):
    """One LSTM layer and the dropout on its output. Training runs each layer from zero state
    over the whole sequence; incremental decoding (decode.py) drives `lstm` with a carried state.

    Bidirectional (model.bidirectional): `reverse_lstm` reads the row from its last position to
    its first, and the two outputs are summed (not concatenated, as nn.LSTM(bidirectional=True)
    does), so the next layer, the projection and the output layer keep the widths of a
    unidirectional model and its pretrained weights load unchanged. Rows are whole (every task
    example is padded to data.seq_len), so the reverse pass starts at the row's last token,
    padding included, whatever the batch."""

    def __init__(self, d_in: int, d_hidden: int, dropout: float, bidirectional: bool = False):
        super().__init__()
        self.lstm = nn.LSTM(d_in, d_hidden, num_layers=1, batch_first=True)
        self.reverse_lstm = nn.LSTM(d_in, d_hidden, num_layers=1, batch_first=True) if bidirectional else None
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)  # (B, T, d_in) -> (B, T, d_hidden)
        if self.reverse_lstm is not None:
            back, _ = self.reverse_lstm(x.flip(1))  # position T-1 first
            y = y + back.flip(1)  # (B, T, d_hidden): position t has read t..T-1 backwards
        return F.dropout(y, self.dropout, self.training)


class LSTMLanguageModel(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.layers = nn.ModuleDict(
            {
                str(i): LSTMBlock(cfg.layer_input(i), cfg.d_hidden, cfg.dropout, cfg.bidirectional)
                for i in range(cfg.n_layers)
            }
        )
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_embed, bias=False) if cfg.has_projection else None
        self.output = nn.Linear(cfg.d_output_in, cfg.vocab_size)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the output matrix with the embedding (when configured). Called again after
        `to_empty()`, which replaces parameters and would silently untie them."""
        if self.cfg.tied and self.embedding is not None and self.output is not None:
            self.output.weight = self.embedding.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """word_language_model's initialisation: embedding and output U(-r, r) (r = init_range,
        the example's 0.1), output bias zero, the LSTM as PyTorch initialises it,
        U(-1/sqrt(d_hidden), 1/sqrt(d_hidden)); all drawn from `generator`, so deterministic
        given its seed. Safe after `to_empty()`."""
        self.tie_weights()
        r = self.cfg.init_range
        if self.embedding is not None and not self.embedding.weight.is_meta:
            nn.init.uniform_(self.embedding.weight, -r, r, generator=generator)
        bound = 1.0 / math.sqrt(self.cfg.d_hidden)
        for block in self.layers.values():
            for p in block.parameters():
                if not p.is_meta:
                    nn.init.uniform_(p, -bound, bound, generator=generator)
        if self.proj is not None and not self.proj.weight.is_meta:
            nn.init.uniform_(self.proj.weight, -bound, bound, generator=generator)
        if self.output is not None and not self.output.weight.is_meta:
            if not (self.cfg.tied and self.embedding is not None):
                nn.init.uniform_(self.output.weight, -r, r, generator=generator)
            nn.init.zeros_(self.output.bias)

    def reset_buffers(self) -> None:
        """No derived buffers (the contract's hook for families that have some)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: token ids (B, T) when this part has the embedding, else hidden states (B, T, d).
        Returns logits (B, T, vocab) when it has the output layer, else hidden states."""
        if self.embedding is not None:
            x = F.dropout(self.embedding(x), self.cfg.dropout, self.training)  # (B, T, d_embed)
        else:  # a later pipeline stage: hidden states in, their gradient out (dense, see above)
            x = _DenseGradient.apply(x)
        for block in self.layers.values():
            x = block(x)  # (B, T, d_hidden)
        if self.proj is not None:
            x = self.proj(x)  # (B, T, d_embed)
        if self.output is None:
            # A pipeline stage's output: nn.LSTM(batch_first=True) returns a transposed (T, B, H)
            # buffer, and the stage's receive buffers are laid out like this tensor (must be dense).
            return x.contiguous()
        return self.output(x)  # (B, T, vocab)
