"""The single-file model format: one `model.safetensors` holding the full, unsharded weights.

A tied output layer is stored once (as `tok_embeddings.weight`), as Hugging Face does,
and re-tied on load. Files are written under a temporary name and renamed, so a crash
never leaves a truncated file that looks complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.transformer import Transformer, build_model

TIED_KEY = "output.weight"


def save_weights(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not (cfg.tied and k == TIED_KEY)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "meshlm", "arch": cfg.arch})
    os.replace(tmp, path)


def load_weights(path: Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> Transformer:
    """Build the model for `cfg` and load `path` into it, checking every name and shape."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model weights {path} not found. Train a model first (`meshlm train`) or pass the right --run."
        )
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"model weights {path} are unreadable or corrupt ({e}). Re-export or retrain the model."
        ) from e
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tied and k == TIED_KEY)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or bad_shapes:
        raise ConfigError(
            f"model weights {path} do not match the model config (missing: {missing[:5]}, unexpected: {unexpected[:5]}, "
            f"shape mismatches: {bad_shapes[:3]}). Use the config.toml saved next to the weights."
        )
    model.load_state_dict(tensors, strict=False)
    if model.rope is not None:
        model.rope.reset()
    return model


def model_from_state_dict(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> Transformer:
    """A Transformer whose parameters *are* `state`'s tensors (moved to `device`); a tied
    output layer may be absent from `state`. Names and shapes must already be right."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    if model.rope is not None:
        model.rope.to_empty(device=device)
        model.rope.reset()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(
            f"the checkpoint has no values for {', '.join(left[:5])}; it does not match the model config."
        )
    return model


__all__ = ["save_weights", "load_weights", "build_model", "model_from_state_dict"]
