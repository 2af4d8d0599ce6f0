"""The gated CNN family's [model] keys. No torch import: the registry loads every family's
config section cheaply, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import ConfigError, ModelConfig, check_non_negative, check_positive


@dataclass
class GCNNConfig(ModelConfig):
    # Width of the residual stream (the token embedding).
    d_model: int = 128
    # Residual blocks, each one gated convolution.
    n_layers: int = 4
    # Width of each causal convolution: a block sees its previous kernel_size - 1 inputs, the
    # model the previous n_layers * (kernel_size - 1) tokens.
    kernel_size: int = 4
    # Bottleneck blocks (0 = plain blocks): project d_model down to this width before the
    # convolution, which then runs on the narrower signal (the paper's [1, k, 1] blocks).
    bottleneck: int = 0
    # Output channels of each convolution (each GLU half); 0 = its input width (d_model, or
    # the bottleneck width). Tensor parallelism splits these.
    channels: int = 0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def conv_in(self) -> int:
        """Input channels of the convolutions."""
        return self.bottleneck or self.d_model

    @property
    def conv_channels(self) -> int:
        """Output channels of each convolution (each half of the gated linear unit)."""
        return self.channels or self.conv_in

    @property
    def tied(self) -> bool:
        return self.tie_embeddings

    @property
    def receptive_field(self) -> int:
        """Tokens a prediction can see, itself included."""
        return self.n_layers * (self.kernel_size - 1) + 1

    def validate(self) -> None:
        super().validate()
        check_positive({"model.d_model": self.d_model, "model.n_layers": self.n_layers})
        check_non_negative({"model.bottleneck": self.bottleneck, "model.channels": self.channels})
        if self.kernel_size < 1:
            raise ConfigError(
                f"'model.kernel_size' must be at least 1 (the current token), got {self.kernel_size}; "
                f"the paper's blocks use 4 or 5."
            )
        if self.init_std <= 0 or self.norm_eps <= 0:
            raise ConfigError("'model.init_std' and 'model.norm_eps' must be positive.")
