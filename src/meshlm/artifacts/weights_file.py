"""The single-file model format: one `model.safetensors` holding the full, unsharded weights.

A tied pair of weights (the family spec's `tied`, e.g. a transformer's output layer tied to
its embedding) is stored once, under the first name, as Hugging Face does, and re-tied on load. Files are written under a temporary name and renamed, so a crash
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
from meshlm.model.registry import build_model, empty_model, family_spec, meta_model


def _tied_copy(cfg: ModelConfig) -> str | None:
    """The name of the tied weight that is not stored (None when nothing is tied)."""
    tied = family_spec(cfg).tied(cfg)
    return tied[1] if tied else None


def save_weights(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    skip = _tied_copy(cfg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k != skip}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "meshlm", "family": cfg.family})
    os.replace(tmp, path)


def load_weights(path: Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
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
    model = empty_model(cfg, device)
    skip = _tied_copy(cfg)
    expected = {k: v for k, v in model.state_dict().items() if k != skip}
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
    model.reset_buffers()
    return model


def model_from_state_dict(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """A model whose parameters *are* `state`'s tensors (moved to `device`); the tied copy may
    be absent from `state`. Names and shapes must already be right."""
    model = meta_model(cfg)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():  # derived buffers (not in a state dict): allocate, then compute
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.reset_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(
            f"the checkpoint has no values for {', '.join(left[:5])}; it does not match the model config."
        )
    return model


__all__ = ["save_weights", "load_weights", "build_model", "model_from_state_dict"]
