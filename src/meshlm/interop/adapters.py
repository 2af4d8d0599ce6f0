"""Which model family a Hugging Face model belongs to, and that family's adapter.

Each family may declare a Hugging Face adapter in its spec (`FamilySpec.hf`); interop reads
config.json, asks every registered family whether it imports that architecture, and hands the
names, layouts and config keys to the one that does."""

from __future__ import annotations

from typing import Any

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import family_names, family_spec
from meshlm.model.spec import HFAdapter


def supported_architectures() -> list[str]:
    """Every Hugging Face architecture some registered family imports."""
    return [a for name in family_names() if family_spec(name).hf for a in family_spec(name).hf.architectures]


def adapter_for_hf(hf: dict[str, Any], source: str = "config.json") -> HFAdapter:
    """The adapter of the family that imports this config.json, or ConfigError naming what is supported."""
    for name in family_names():
        adapter = family_spec(name).hf
        if adapter is not None and adapter.architecture_of(hf):
            return adapter
    archs = hf.get("architectures") or [hf.get("model_type")]
    archs = [archs] if isinstance(archs, str) else archs
    raise ConfigError(
        f"{source}: architecture {', '.join(map(str, archs))} is not supported by meshlm. Supported architectures: "
        f"{', '.join(supported_architectures())}. Convert the model with its own library, or pick a model of a "
        f"supported family."
    )


def adapter_of(cfg: ModelConfig) -> HFAdapter:
    """The Hugging Face adapter of a model's family, or ConfigError when the family has none."""
    adapter = family_spec(cfg).hf
    if adapter is None:
        raise ConfigError(
            f"model.family '{cfg.family}' has no Hugging Face format: export and import work for families with an "
            f"adapter ({', '.join(n for n in family_names() if family_spec(n).hf)}). Keep the meshlm run directory instead."
        )
    return adapter


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a config.json dict to the [model] section of the family that imports it."""
    return adapter_for_hf(hf, source).config_from_hf(hf, source)
