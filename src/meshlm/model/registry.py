"""Model families by name: `model.family` -> FamilySpec.

The built-in families register their [model] config sections here at import (cheap: the config
modules import no torch), and their specs on first use. Everything outside `model/` asks this
module, never a family directly:

    spec = family_spec(cfg)              # or family_spec("gcnn")
    model = build_model(cfg.model, device, seed=0)

A new family: a folder under model/ with config.py (its ModelConfig subclass), model.py (the
single-device module) and spec.py (`SPEC = FamilySpec(...)`), then one line in BUILTIN below;
docs/adding-a-family.md has the checklist.
"""

from __future__ import annotations

import importlib

from meshlm.config import ConfigError, ModelConfig, model_section, register_model_section
from meshlm.model.gcnn.config import GCNNConfig
from meshlm.model.hmm.config import HMMConfig
from meshlm.model.lstm.config import LSTMConfig
from meshlm.model.maxent.config import MaxEntConfig
from meshlm.model.transformer.config import TransformerConfig

# family name -> (its config section, the module that defines its SPEC)
BUILTIN: dict[str, tuple[type[ModelConfig], str]] = {
    "transformer": (TransformerConfig, "meshlm.model.transformer.spec"),
    "maxent": (MaxEntConfig, "meshlm.model.maxent.spec"),
    "hmm": (HMMConfig, "meshlm.model.hmm.spec"),
    "gcnn": (GCNNConfig, "meshlm.model.gcnn.spec"),
    "lstm": (LSTMConfig, "meshlm.model.lstm.spec"),
}

_SPEC_MODULES: dict[str, str] = {}
_SPECS: dict = {}


def register_family(name: str, config_type: type[ModelConfig], spec_module: str) -> None:
    """Make `model.family = name` available: its config keys now, its spec (the SPEC attribute of
    `spec_module`) when first asked for."""
    register_model_section(name, config_type)
    _SPEC_MODULES[name] = spec_module


for _name, (_config_type, _module) in BUILTIN.items():
    register_family(_name, _config_type, _module)


def family_names() -> list[str]:
    return sorted(_SPEC_MODULES)


def family_spec(cfg_or_name):
    """The FamilySpec of a [model] section (ModelConfig), a whole Config, or a family name.
    A [model] section with a `derived_spec()` method (a model derived from another family's,
    such as a task model over a backbone: meshlm.tasks) answers with its own spec."""
    if not isinstance(cfg_or_name, str):
        derived = getattr(getattr(cfg_or_name, "model", cfg_or_name), "derived_spec", None)
        if callable(derived):
            return derived()
    name = cfg_or_name if isinstance(cfg_or_name, str) else getattr(cfg_or_name, "model", cfg_or_name).family
    if name not in _SPECS:
        model_section(name)  # the clear "unknown model.family" error
        spec = importlib.import_module(_SPEC_MODULES[name]).SPEC
        if spec.name != name:
            raise ConfigError(f"family '{name}' is registered with a spec named '{spec.name}'.")
        _SPECS[name] = spec
    return _SPECS[name]


def build_model(cfg: ModelConfig, device="cpu", seed: int | None = None):
    """Build the full single-device model of `cfg`'s family on the meta device (no memory),
    materialise it on `device`, then initialise: with a seed, identical weights on every process
    and every device."""
    import torch

    spec = family_spec(cfg)
    with torch.device("meta"):
        model = spec.model_class(cfg)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(generator)
    return model


def empty_model(cfg: ModelConfig, device="cpu"):
    """The model's modules with uninitialised storage on `device`, weights tied and derived
    buffers computed: to load a state dict into."""
    import torch

    with torch.device("meta"):
        model = family_spec(cfg).model_class(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    return model


def meta_model(cfg: ModelConfig):
    """The model on the meta device: names and shapes, no memory."""
    import torch

    with torch.device("meta"):
        return family_spec(cfg).model_class(cfg)
