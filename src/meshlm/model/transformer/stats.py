"""The transformer's parameter counts and FLOPs per token, from the config alone (no model needed)."""

from __future__ import annotations

from meshlm.model.spec import StageCosts
from meshlm.model.transformer.config import TransformerConfig


def layer_params(cfg: TransformerConfig) -> int:
    """Parameters of one transformer block."""
    d, hd = cfg.d_model, cfg.head_dim
    bias = cfg.arch == "gpt2"
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if bias else 0)
    n_mlp_in = 2 if cfg.arch == "llama" else 1
    mlp = n_mlp_in * d * cfg.ffn_dim + cfg.ffn_dim * d + (cfg.ffn_dim + d if bias else 0)
    norms = 2 * d * (2 if cfg.arch == "gpt2" else 1)  # LayerNorm has a bias, RMSNorm doesn't
    return attn + mlp + norms


def embedding_params(cfg: TransformerConfig) -> int:
    """Token (+ learned position) embeddings, and the output layer when it is not tied."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.arch == "gpt2":
        n += cfg.max_seq_len * cfg.d_model
    if not cfg.tied:
        n += cfg.vocab_size * cfg.d_model
    return n


def count_params(cfg: TransformerConfig) -> int:
    final_norm = cfg.d_model * (2 if cfg.arch == "gpt2" else 1)
    return cfg.n_layers * layer_params(cfg) + embedding_params(cfg) + final_norm


def block_matmul_params(cfg: TransformerConfig) -> int:
    """Weights of one block that take part in a matrix multiply per token (attention q, k, v, o + MLP)."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    n_mlp_in = 2 if cfg.arch == "llama" else 1
    return d * q + 2 * d * kv + q * d + (n_mlp_in + 1) * d * cfg.ffn_dim


def matmul_params(cfg: TransformerConfig) -> int:
    """Parameters that take part in a matrix multiply per token: every weight matrix of the
    blocks plus the output layer (tied or not); embedding look-ups and norms cost no FLOPs."""
    return cfg.n_layers * block_matmul_params(cfg) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: TransformerConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs to process one token: 2 per matmul parameter in the forward pass, plus
    attention scores and the weighted sum (2 * 2 * T * d per layer, T = sequence length,
    counted without the causal halving as is customary for MFU, which is exactly the work
    of non-causal attention, `model.causal = false`). Backward costs twice
    the forward, so training is 3x: 6N + 12 L T d (Kaplan et al. 2020; PaLM appendix B)."""
    forward = 2 * matmul_params(cfg) + 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 3 * forward if training else forward


def stage_costs(cfg: TransformerConfig) -> StageCosts:
    """What the pipeline splitter balances, in matmul parameters per token (proportional to
    training FLOPs): each block its attention + MLP; the last stage also the output projection
    (vocab x d_model, tied or not; the final norm is negligible next to it); the first stage
    the embedding, a gather forward and a scatter-add backward of about d per token, no matmul:
    in practice a tie-breaker only."""
    d = cfg.d_model
    return StageCosts(first=d, blocks=[block_matmul_params(cfg)] * cfg.n_layers, last=cfg.vocab_size * d)
