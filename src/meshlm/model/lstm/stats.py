"""The LSTM's parameter counts and FLOPs per token, from the config alone (no model needed)."""

from __future__ import annotations

from meshlm.model.lstm.config import LSTMConfig
from meshlm.model.spec import StageCosts


def layer_matmul_params(cfg: LSTMConfig, i: int) -> int:
    """Weights of layer i that multiply per token: the four gates' input and recurrent
    matrices, W_ih (4H, d_in) and W_hh (4H, H); twice with the reverse direction."""
    directions = 2 if cfg.bidirectional else 1
    return directions * 4 * cfg.d_hidden * (cfg.layer_input(i) + cfg.d_hidden)


def layer_params(cfg: LSTMConfig, i: int) -> int:
    """Parameters of layer i: its matrices plus nn.LSTM's two bias vectors b_ih, b_hh (4H each),
    per direction."""
    return layer_matmul_params(cfg, i) + (2 if cfg.bidirectional else 1) * 2 * 4 * cfg.d_hidden


def head_matmul_params(cfg: LSTMConfig) -> int:
    """The projection (when present) and the output layer (tied or not)."""
    proj = cfg.d_hidden * cfg.d_embed if cfg.has_projection else 0
    return proj + cfg.d_output_in * cfg.vocab_size


def count_params(cfg: LSTMConfig) -> int:
    embedding = cfg.vocab_size * cfg.d_embed
    output = (0 if cfg.tied else cfg.d_output_in * cfg.vocab_size) + cfg.vocab_size  # weight unless tied, bias
    proj = cfg.d_hidden * cfg.d_embed if cfg.has_projection else 0
    return embedding + sum(layer_params(cfg, i) for i in range(cfg.n_layers)) + proj + output


def matmul_params(cfg: LSTMConfig) -> int:
    return sum(layer_matmul_params(cfg, i) for i in range(cfg.n_layers)) + head_matmul_params(cfg)


def flops_per_token(cfg: LSTMConfig, seq_len: int, training: bool = True) -> float:
    """2 FLOPs per matmul weight per token in the forward pass (the gates' element-wise maths,
    about 10 H per layer, is left out as biases and norms are for the transformer), x3 when
    training. Independent of the sequence length: the recurrence carries a fixed-size state."""
    forward = 2 * matmul_params(cfg)
    return 3 * forward if training else forward


def stage_costs(cfg: LSTMConfig) -> StageCosts:
    """What the pipeline splitter balances, in matmul weights per token: each layer its gates,
    the last stage the projection and output layer, the first stage the embedding look-up
    (about d_embed per token, no matmul: a tie-breaker)."""
    return StageCosts(
        first=cfg.d_embed,
        blocks=[layer_matmul_params(cfg, i) for i in range(cfg.n_layers)],
        last=head_matmul_params(cfg),
    )
