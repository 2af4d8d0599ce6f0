"""Timings the planner calibrates its CPU cost model with (meshlm.plan.cpu_local): the
elementwise work of a transformer block and of the head, run with this family's own modules
and functions, so the planner measures what training runs."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from meshlm.model.loss import lm_loss
from meshlm.model.transformer.config import TransformerConfig
from meshlm.model.transformer.model import RotaryEmbedding, apply_rotary, make_norm


def measure_reference_block(cfg: TransformerConfig, batch: int) -> dict:
    """The elementwise work of the reference block, run as meshlm runs it (the norms, rotary
    embeddings, SwiGLU product, residual adds, the attention output's copy; forward and backward)
    without its GEMMs and attention; and the head (final norm, a narrow output layer, the
    cross-entropy) with its GEMM timed alone, alternated."""
    B, T, d, hd = batch, cfg.max_seq_len, cfg.d_model, cfg.head_dim
    rope = RotaryEmbedding(hd, T, cfg.rope_theta)
    norm1, norm2 = make_norm(cfg), make_norm(cfg)
    x = torch.randn(B, T, d, requires_grad=True)
    q_in = torch.randn(B, T, cfg.n_heads * hd, requires_grad=True)
    k_in = torch.randn(B, T, cfg.kv_heads * hd, requires_grad=True)
    up = [torch.randn(B, T, cfg.ffn_dim, requires_grad=True) for _ in range(2)]
    leaves = [x, q_in, k_in, *up]

    def elementwise():
        h = norm1(x)
        q = apply_rotary(q_in.view(B, T, -1, hd), rope.cos[:T], rope.sin[:T])
        k = apply_rotary(k_in.view(B, T, -1, hd), rope.cos[:T], rope.sin[:T])
        ctx = q.transpose(1, 2).transpose(1, 2).reshape(B, T, -1)  # the context's contiguous copy
        h = x + h * ctx[..., :d]
        h2 = norm2(h)
        h = h + h2 * (F.silu(up[0]) * up[1])[..., :d]
        (h.sum() + k.sum()).backward()
        for t in leaves:
            t.grad = None

    dh, vocab = 32, cfg.vocab_size
    head = torch.nn.Linear(dh, vocab, bias=False)
    norm = torch.nn.RMSNorm(dh)
    hx = torch.randn(B, T, dh, requires_grad=True)
    y = torch.randint(0, vocab, (B, T))
    g = torch.randn(B, T, vocab)

    def head_step():
        lm_loss(head(norm(hx)), y).backward()
        hx.grad = None
        head.weight.grad = None

    def head_gemm():
        head(hx).backward(g)
        hx.grad = None
        head.weight.grad = None

    fns = {"elementwise": elementwise, "head": head_step, "head_gemm": head_gemm}
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(7):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) / 2)
    return {"reference_" + k + "_s": v for k, v in best.items()}
