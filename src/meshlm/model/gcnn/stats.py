"""The gated CNN's parameter counts and FLOPs per token, from the config alone (no model needed)."""

from __future__ import annotations

from meshlm.model.gcnn.config import GCNNConfig
from meshlm.model.spec import StageCosts


def block_matmul_params(cfg: GCNNConfig) -> int:
    """Weights of one block that multiply every token: the bottleneck projection, both
    convolutions (c_in x C x k each) and the projection back to d_model."""
    d, c_in, C, k = cfg.d_model, cfg.conv_in, cfg.conv_channels, cfg.kernel_size
    down = d * cfg.bottleneck
    return down + 2 * c_in * C * k + C * d


def block_params(cfg: GCNNConfig) -> int:
    """Parameters of one block: its matmul weights, the two convolutions' biases, the norm."""
    return block_matmul_params(cfg) + 2 * cfg.conv_channels + cfg.d_model


def count_params(cfg: GCNNConfig) -> int:
    """Blocks + token embedding + final norm + the output layer when it is not tied."""
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tied else 2)
    return cfg.n_layers * block_params(cfg) + embeddings + cfg.d_model


def flops_per_token(cfg: GCNNConfig, seq_len: int, training: bool = True) -> float:
    """2 FLOPs per matmul weight per token (blocks and the output layer, tied or not; the
    embedding is a look-up), independent of the sequence length: a convolution sees a fixed
    window. Backward costs twice the forward, so training is 3x. The gate's sigmoid and
    product, the norms and the residual adds are a few FLOPs per channel, left out as
    they are for the transformer."""
    forward = 2 * (cfg.n_layers * block_matmul_params(cfg) + cfg.vocab_size * cfg.d_model)
    return 3 * forward if training else forward


def stage_costs(cfg: GCNNConfig) -> StageCosts:
    """What the pipeline splitter balances, in matmul weights per token: each block its own,
    the last stage the output projection (vocab x d_model), the first stage the embedding
    look-up (about d_model per token: a tie-breaker)."""
    d = cfg.d_model
    return StageCosts(first=d, blocks=[block_matmul_params(cfg)] * cfg.n_layers, last=cfg.vocab_size * d)
