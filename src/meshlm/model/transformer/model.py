"""A decoder-only transformer on one device: the `llama` and `gpt2` variants.

This file knows nothing about processes, ranks or meshes. Parallelism is
applied from outside (meshlm.parallel) by swapping or wrapping submodules, so
the module layout here is part of the contract:

    tok_embeddings   nn.Embedding(vocab, d)            (None on later pipeline stages)
    pos_embeddings   nn.Embedding(max_seq_len, d)      gpt2 only
    layers           nn.ModuleDict {"0": Block, ...}   a dict so that pipeline stages
                                                       can drop layers and keep names
    norm             RMSNorm / LayerNorm               (None on earlier pipeline stages)
    output           nn.Linear(d, vocab)               (None on earlier pipeline stages)

Attention reshapes with `-1` heads (`view(B, T, -1, head_dim)`), so a
tensor-parallel split of the projections needs no change here: each rank sees
only its own heads.

Attention is causal (`model.causal`, the default): position t attends to positions <= t. With
causal = false every position attends to the whole row, a backbone option for taggers; such a
model cannot decode incrementally (generation refuses it before loading).

Incremental decoding: `forward(tokens, cache=...)` with a key/value cache from
decode.py runs the same modules on new tokens only. The cache says where the
tokens sit (`cache.positions`, for the position embeddings and rotary tables),
stores each layer's keys and values and attends over the cached ones; nothing
else in the forward pass changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.transformer.config import TransformerConfig


class RotaryEmbedding(nn.Module):
    """Precomputed rotary position embedding (RoPE) tables, laid out for `apply_rotary`:
    cos = [cos, cos] and sin = [-sin, sin] over the two halves of a head, (max_seq_len, head_dim)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Not persistent: derived from the config, recomputed by reset() after a meta-device build.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        if self.cos.is_meta:
            return
        device = self.cos.device
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos(), angles.sin()  # (max_seq_len, head_dim/2)
        self.cos.copy_(torch.cat([cos, cos], dim=-1))
        self.sin.copy_(torch.cat([-sin, sin], dim=-1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head, the Hugging Face / Llama layout:
    (x1 cos - x2 sin, x2 cos + x1 sin), computed as x * [cos, cos] + [x2, x1] * [-sin, sin]
    (the same products and sums, so the same bits, in fewer operations).

    x: (B, T, H, head_dim); cos, sin: RotaryEmbedding's rows, (T, head_dim) or (B, T, head_dim),
    or already (B, T, 1, head_dim).
    """
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal  # false: every position attends to the whole row (config.py says why)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
        # Decoding copies fuse wq, wk and wv into one matrix multiply (decode.py), output sizes qkv_sizes.
        self.wqkv: nn.Linear | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None) -> torch.Tensor:
        """rope: the full rotary tables (max_seq_len, head_dim), cut here to the length x has
        *inside* attention (under sequence parallelism the input arrives gathered to all T);
        with a cache, the tables at the new tokens' positions, (B, T, 1, head_dim).
        cache: this layer's view of a KV cache (decode.py): it stores k and v and attends q
        over every cached key of the sequence."""
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, -1, self.head_dim)
        if rope is not None:
            cos, sin = rope if cache is not None else (rope[0][:T], rope[1][:T])
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            return self.wo(cache.attend(q, k, v).reshape(B, T, -1))  # (B, T, n_heads, head_dim) -> (B, T, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, head_dim)
        groups = q.shape[1] // k.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=groups > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """llama: SwiGLU, w2(silu(w1 x) * w3 x). gpt2: w2(gelu(w1 x)) with GPT-2's tanh GELU."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = not self.gated
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) if self.gated else None
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=bias)
        self.w13: nn.Linear | None = None  # decoding copies fuse w1 and w3 (decode.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            a, b = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(a) * b)
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.arch == "llama" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the output matrix with the token embedding (gpt2 always; llama when configured).
        Called again after `to_empty()`, which replaces parameters and would silently untie them."""
        if self.cfg.tied and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, residual projections scaled by
        1/sqrt(2 * n_layers), zero biases, unit norms. Safe to call after a meta-device
        build has been materialised with `to_empty()`."""
        self.tie_weights()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("attention.wo") or name.endswith("feed_forward.w2")
                if module.weight.is_meta:
                    continue
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and not module.weight.is_meta:
                if not (module is self.tok_embeddings and self.cfg.tied and self.output is not None):
                    nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and not module.weight.is_meta:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the derived (non-persistent) buffers: after `to_empty()` or a load."""
        if self.rope is not None:
            self.rope.reset()

    def forward(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """tokens: (B, T) token ids, or (B, T, d) hidden states on a later pipeline stage.
        Returns logits (B, T, vocab), or hidden states (B, T, d) on an earlier stage.
        cache: a KV cache (decode.py) holding the sequences' earlier tokens; the tokens given
        are then new ones at `cache.positions` (B, T), and only the positions the cache
        selects get logits."""
        positions = cache.positions if cache is not None else None  # (B, T) of the new tokens
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)  # (B, T, d)
            if self.pos_embeddings is not None:
                where = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
                h = h + self.pos_embeddings(where)
        else:
            h = tokens
        rope = None
        if self.rope is not None:  # whole tables, or the new tokens' rows ready to broadcast over heads
            rope = (self.rope.cos, self.rope.sin)
            if positions is not None:
                rope = (rope[0][positions].unsqueeze(-2), rope[1][positions].unsqueeze(-2))  # (B, T, 1, head_dim)
        for name, layer in self.layers.items():
            h = layer(h, rope, None if cache is None else cache.layer(name))
        if cache is not None:
            h = cache.select(h)  # e.g. each prompt's last position only: (n, d)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)  # (B, T, vocab)
        return h


def build_model(cfg: TransformerConfig, device: torch.device | str = "cpu", seed: int | None = None) -> Transformer:
    """Build on the meta device (no memory), materialise on `device`, then initialise.
    Going through meta keeps large models cheap to construct; with a seed the weights
    are identical on every process and every device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model
