"""A gated convolutional language model on one device (Dauphin et al. 2017).

This file knows nothing about processes, ranks or meshes. Parallelism is applied from outside
(meshlm.parallel) by swapping submodules, so the module layout is part of the contract:

    tok_embeddings   nn.Embedding(vocab, d)                 (None on later pipeline stages)
    layers           nn.ModuleDict {"0": Block, ...}        the repeated blocks
      .norm          RMSNorm(d)
      .down          nn.Linear(d, bottleneck)               bottleneck blocks only, else None
      .glu           GatedConv: the tensor-parallel region
        .conv_a      nn.Conv1d(c_in, C, k)                  the linear half
        .conv_b      nn.Conv1d(c_in, C, k)                  the gate
        .proj        nn.Linear(C, d)                        back to the residual stream
    norm             RMSNorm(d)                             (None on earlier pipeline stages)
    output           nn.Linear(d, vocab)                    (None on earlier pipeline stages)

One block: h = x + proj((a * sigmoid(b))), a = conv_a(u), b = conv_b(u), u = down(norm(x)).
The convolutions are causal: their input is left-padded by k - 1 zeros, so position t sees
inputs t-k+1..t only. No position embedding: the convolutions know the order.

The two GLU halves are two convolutions rather than one of 2C channels split in two, so that
tensor parallelism can give rank r channels [r C/tp, (r+1) C/tp) of both with one contiguous
slice each (a fused 2C weight would need its two halves cut consistently).

Departures from the paper: pre-norm residual blocks with RMSNorm (the paper used weight
normalisation) and a final norm, so the model trains at the learning rates of the
transformer configs; a plain softmax output instead of the adaptive softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.gcnn.config import GCNNConfig


class GatedConv(nn.Module):
    """Causal gated convolution and the projection back to d_model: the span that tensor
    parallelism splits over channels (conv_a, conv_b column-parallel, proj row-parallel)."""

    def __init__(self, cfg: GCNNConfig):
        super().__init__()
        self.kernel_size = cfg.kernel_size
        self.conv_a = nn.Conv1d(cfg.conv_in, cfg.conv_channels, cfg.kernel_size)
        self.conv_b = nn.Conv1d(cfg.conv_in, cfg.conv_channels, cfg.kernel_size)
        self.proj = nn.Linear(cfg.conv_channels, cfg.d_model, bias=False)

    def forward(self, u: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """u: (B, T, c_in) the convolution's input. past: (B, c_in, k-1), the k-1 inputs before
        u (incremental decoding), or None at the start of a sequence: zeros, the causal padding."""
        u = u.transpose(1, 2)  # (B, c_in, T)
        if past is None:
            u = F.pad(u, (self.kernel_size - 1, 0))  # (B, c_in, k-1+T)
        else:
            u = torch.cat((past.to(u.dtype), u), dim=2)  # (B, c_in, k-1+T)
        a = self.conv_a(u)  # (B, C, T)
        b = self.conv_b(u)  # (B, C, T)
        return self.proj((a * torch.sigmoid(b)).transpose(1, 2))  # (B, T, d)


class Block(nn.Module):
    """Pre-norm residual block: x + glu(down(norm(x)))."""

    def __init__(self, cfg: GCNNConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.down = nn.Linear(cfg.d_model, cfg.bottleneck, bias=False) if cfg.bottleneck else None
        self.glu = GatedConv(cfg)

    def conv_input(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's input u for the residual stream x: (B, T, d) -> (B, T, c_in)."""
        u = self.norm(x)
        return self.down(u) if self.down is not None else u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.glu(self.conv_input(x))


class GatedCNN(nn.Module):
    def __init__(self, cfg: GCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the output matrix with the token embedding when configured. Called again after
        `to_empty()`, which replaces parameters and would silently untie them."""
        if self.cfg.tied and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for embeddings, convolutions and projections, the residual projection
        (glu.proj) scaled by 1/sqrt(2 n_layers) as in GPT-2; zero biases (the gate starts half
        open), unit norms. Safe after a meta-device build materialised with `to_empty()`."""
        self.tie_weights()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.is_meta:
                continue
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(weight, 0.0, residual_std if name.endswith("glu.proj") else std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                if not (module is self.tok_embeddings and self.cfg.tied and self.output is not None):
                    nn.init.normal_(weight, 0.0, std, generator=generator)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(weight)

    def reset_buffers(self) -> None:
        """No derived buffers: nothing to recompute."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) token ids, or (B, T, d) hidden states on a later pipeline stage.
        Returns logits (B, T, vocab), or hidden states (B, T, d) on an earlier stage."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, d)
        for block in self.layers.values():
            h = block(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)  # (B, T, vocab)
        return h
