"""The single-file model format: one `model.safetensors` holding the full, unsharded weights.

A tied pair of weights (the family spec's `tied`, e.g. a transformer's output layer tied to
its embedding) is stored once, under the first name, as Hugging Face does, and re-tied on load.
Files are written under a temporary name and renamed, so a crash never leaves a truncated file
that looks complete; each gets a manifest (size and sha256, weights_manifest.py) that loading
checks, and weights that are not finite are refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meshlm.artifacts.weights_manifest import file_mode, verify_weights_file, write_manifest
from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import build_model, empty_model, family_spec, meta_model


def _tied_copy(cfg: ModelConfig) -> str | None:
    """The name of the tied weight that is not stored (None when nothing is tied)."""
    tied = family_spec(cfg).tied(cfg)
    return tied[1] if tied else None


def weights_bytes(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig | None = None) -> int:
    """The size of the tensors a weights file would hold (the header adds a few KiB)."""
    skip = _tied_copy(cfg) if cfg is not None else None
    return sum(v.numel() * v.element_size() for k, v in state_dict.items() if k != skip)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`tensors` as a safetensors file at `path`, written under a temporary name (removed if the
    write fails), given the usual file mode (0644), renamed into place, then its manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_manifest(path)


def save_weights(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    skip = _tied_copy(cfg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k != skip}
    write_safetensors(tensors, path, {"format": "pt", "producer": "meshlm", "family": cfg.family})


def check_finite(
    tensors: Mapping[str, torch.Tensor], source: Path | str, log_probabilities: Collection[str] = ()
) -> None:
    """ConfigError naming the first tensor of `source` that holds NaN or infinity (in the
    `log_probabilities` tensors, -inf is probability zero and allowed)."""
    for name, value in tensors.items():
        if not value.is_floating_point():
            continue
        valid = torch.isfinite(value)
        if name in log_probabilities:
            valid |= value == float("-inf")
        if not bool(valid.all()):
            bad = int((~valid).sum())
            raise ConfigError(
                f"model weights {source}: tensor '{name}' holds {bad} non-finite value(s) (NaN or infinity), so "
                f"every output would be garbage. Use an earlier checkpoint of the run (meshlm export --run RUN "
                f"--step N) or retrain with a lower train.lr."
            )


def load_weights(
    path: Path, cfg: ModelConfig, device: torch.device | str = "cpu", verify: bool = True
) -> torch.nn.Module:
    """Build the model for `cfg` and load `path` into it, checking the file against its manifest
    (the sha256 only when `verify`), every name and shape, and that every weight is finite."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"model weights {path} is a directory; pass the model.safetensors file inside it.")
    if not path.is_file():
        raise ConfigError(
            f"model weights {path} not found. Train a model first (`meshlm train`) or pass the right --run."
        )
    verify_weights_file(path, verify)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"model weights {path} are unreadable or corrupt ({e}). Re-export or retrain the model."
        ) from e
    check_finite(tensors, path, family_spec(cfg).log_probability_weights)
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


__all__ = [
    "save_weights",
    "load_weights",
    "build_model",
    "model_from_state_dict",
    "write_safetensors",
    "weights_bytes",
    "check_finite",
]
