"""A model family with uneven blocks, registered for the measured pipeline split's tests and
benchmark: a llama whose blocks listed in `model.wide_blocks` have a feed-forward layer
`wide_factor` times wider, while its spec describes every block alike (the transformer's
per-block matmul count), as a family that does not model its own costs would. The count
split ("auto") then cuts by layer count; "measured" sees the wide blocks.

    import uneven_family  # registers model.family = "uneven"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from meshlm.model.registry import register_family
from meshlm.model.transformer.config import TransformerConfig


@dataclass
class UnevenConfig(TransformerConfig):
    family: str = "uneven"
    wide_blocks: list[int] = field(default_factory=list)
    wide_factor: int = 4


def _model_class():
    import torch

    from meshlm.model.transformer.model import Block, Transformer

    class UnevenTransformer(Transformer):
        def __init__(self, cfg: UnevenConfig):
            super().__init__(cfg)
            wide = dataclasses.replace(cfg, ffn_hidden=cfg.ffn_dim * cfg.wide_factor)
            for i in cfg.wide_blocks:
                self.layers[str(i)] = Block(wide)
            self.init_weights()

    def count_params(cfg: UnevenConfig) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in UnevenTransformer(cfg).parameters())

    return UnevenTransformer, count_params


def _spec():
    from meshlm.model.transformer.spec import SPEC

    model_class, count_params = _model_class()
    return dataclasses.replace(
        SPEC,
        name="uneven",
        config_type=UnevenConfig,
        model_class=model_class,
        count_params=count_params,
        hf=None,
        calibrate=None,
        describe=lambda cfg: f"llama, {cfg.n_layers} layers, blocks {cfg.wide_blocks} {cfg.wide_factor}x wider",
    )


SPEC = _spec()
register_family("uneven", UnevenConfig, __name__)
