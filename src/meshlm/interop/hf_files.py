"""Reading a local Hugging Face model directory: config.json and the weight files
(safetensors, sharded or not, or legacy pytorch_model.bin). Family-independent: what the
names and shapes mean is the family's Hugging Face adapter's business (FamilySpec.hf)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from meshlm.config import ConfigError

Tensors = dict[str, torch.Tensor]


def read_hf_config(hf_dir: Path | str) -> dict[str, Any]:
    """The parsed `config.json` of a local Hugging Face model directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(
            f"Hugging Face model directory {hf_dir} not found. Pass a local directory holding config.json and the "
            f"weights (download one first, e.g. `huggingface-cli download MODEL --local-dir DIR`)."
        )
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{hf_dir} has no config.json, so it is not a Hugging Face model directory. Pass the directory that `save_pretrained` wrote."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}). Re-download or re-save the model.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a JSON object, got {type(data).__name__}. Re-download or re-save the model."
        )
    return data


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- reading files


def hf_weight_files(hf_dir: Path | str) -> list[Path]:
    """The weight files of a Hugging Face model directory, in order of preference:
    model.safetensors, sharded safetensors (index), pytorch_model.bin, sharded .bin (index)."""
    hf_dir = Path(hf_dir)
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{index} is not a valid shard index ({e!r}); re-download or re-save the model."
                ) from None
            files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConfigError(
                    f"{index} lists shards that are not in {hf_dir}: {', '.join(absent[:4])}. Download the missing files."
                )
            return files
    legacy = hf_dir / "pytorch_model.bin"
    if legacy.is_file():
        return [legacy]
    raise ConfigError(
        f"no weights found in {hf_dir}: expected model.safetensors, model-0000N-of-0000M.safetensors with "
        f"model.safetensors.index.json, or pytorch_model.bin. Download the weight files too, not only config.json."
    )


def read_hf_tensors(hf_dir: Path | str, dtype: torch.dtype | None = torch.float32) -> Tensors:
    """All tensors of a Hugging Face model directory on the CPU, cast to `dtype` (None keeps the stored dtype)."""
    out: Tensors = {}
    for path in hf_weight_files(hf_dir):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        out[name] = _cast(f.get_tensor(name), dtype)
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"{path} is unreadable or corrupt ({e}). Re-download the model.") from e
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle / zip errors come in many types
                raise ConfigError(
                    f"{path} could not be read as a PyTorch weights file ({e}). Re-download the model, preferably as safetensors."
                ) from e
            if not isinstance(loaded, dict):
                raise ConfigError(
                    f"{path} does not hold a state dict (got {type(loaded).__name__}); re-save the model with `save_pretrained`."
                )
            out.update({k: _cast(v, dtype) for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


__all__ = ["read_hf_config", "hf_weight_files", "read_hf_tensors", "natural_key"]
