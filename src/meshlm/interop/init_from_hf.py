"""`train.init_from_hf = HF_DIR`: fine-tune a local Hugging Face model under any layout.

The directory's config.json replaces the [model] section (so every layout check sees the
real model), its tokenizer.json is used to prepare the data, and its weights replace the
initialisation. The full model is loaded on every rank and then split by parallelize(),
exactly like a freshly initialised one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meshlm.config import Config, ConfigError, check_left_to_right, load_config, validate
from meshlm.interop.adapters import adapter_of, model_config_from_hf
from meshlm.interop.hf_files import read_hf_config, read_hf_tensors
from meshlm.model.registry import family_spec


def load_training_config(name: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`load_config` for language-model training (`meshlm train`, the API's fit): with
    `train.init_from_hf` set, the Hugging Face model's architecture and tokenizer are applied
    before validation, so every check sees the real model. A model that sees right context (a
    tagger's backbone option) is refused: next-token prediction would be trivial."""
    cfg = load_config(name, overrides, validated=False)
    if cfg.train.init_from_hf:
        apply_init_from_hf(cfg)
    validate(cfg)
    check_left_to_right(cfg.model, "`meshlm train` (language-model pretraining)")
    return cfg


def apply_init_from_hf(cfg: Config) -> None:
    """Replace cfg.model by the Hugging Face model's architecture; use its tokenizer."""
    hf_dir = Path(cfg.train.init_from_hf)
    if not hf_dir.is_dir():
        raise ConfigError(
            f"'train.init_from_hf' points to {hf_dir}, which is not a directory. Pass a local Hugging Face model "
            f"directory (config.json + model.safetensors); meshlm never downloads."
        )
    cfg.model = model_config_from_hf(read_hf_config(hf_dir), source=str(hf_dir / "config.json"))
    if not cfg.data.tokenizer:
        tokenizer = hf_dir / "tokenizer.json"
        if not tokenizer.is_file():
            raise ConfigError(
                f"{hf_dir} has no tokenizer.json, which training needs to tokenise the corpus the way the model "
                f"expects. Save the model's fast tokenizer there, or set data.tokenizer to its tokenizer.json."
            )
        cfg.data.tokenizer = str(tokenizer)


@torch.no_grad()
def load_hf_weights_into(model: torch.nn.Module, cfg: Config) -> None:
    """Copy the Hugging Face weights into a freshly built (full, unsharded) model."""
    hf_dir = Path(cfg.train.init_from_hf)
    state = adapter_of(cfg.model).state_from_hf(read_hf_tensors(hf_dir, torch.float32), cfg.model, str(hf_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = family_spec(cfg).tied(cfg.model)
    missing = [k for k in missing if not (tied and k == tied[1])]
    if missing or unexpected:
        raise ConfigError(
            f"{hf_dir} does not match its own config (missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
