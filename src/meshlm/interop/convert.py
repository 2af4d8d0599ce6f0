"""Import Hugging Face models into meshlm and export meshlm runs to Hugging Face.

    load_hf_model(hf_dir)            -> (ModelConfig, model): start training or
                                        inference from a Hugging Face checkpoint
    import_hf(hf_dir, run_dir)       -> a meshlm run directory (config.toml,
                                        model.safetensors, tokenizer.json)
    export_hf(run_dir, hf_dir)       -> a directory `transformers` loads with
                                        AutoModelForCausalLM / AutoTokenizer, no meshlm needed

The Hugging Face files are written by hand (JSON + safetensors): meshlm does not
depend on `transformers`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from meshlm.artifacts.run_dir import clear_run_files, copy_file_atomic, load_run_config, write_text_atomic
from meshlm.artifacts.weights_file import (
    check_finite,
    load_weights,
    model_from_state_dict,
    save_weights,
    write_safetensors,
)
from meshlm.artifacts.weights_manifest import SUFFIX as MANIFEST_SUFFIX
from meshlm.config import Config, ConfigError, ModelConfig, validate
from meshlm.interop.adapters import adapter_for_hf, adapter_of
from meshlm.interop.hf_files import read_hf_config, read_hf_tensors
from meshlm.utils.paths import output_dir_problem

# Files a Hugging Face model directory may hold; an export replaces all of them
# so that no stale shard or tokenizer from an earlier model is picked up.
_HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors" + MANIFEST_SUFFIX,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_HF_SHARD_GLOBS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
# Special tokens recognised when writing tokenizer_config.json / generation_config.json.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- import


def load_hf_model(hf_dir: Path | str, device: torch.device | str = "cpu") -> tuple[ModelConfig, torch.nn.Module]:
    """Build a meshlm model from a local Hugging Face directory, in float32 on `device`.

    The config is mapped (and refused where meshlm would compute something else),
    every tensor name and shape is checked, and the weights are loaded without an
    extra copy: the model's parameters are the tensors read from the files.
    """
    model_cfg, state = read_hf_model(hf_dir)
    run_config_for(model_cfg)  # meshlm's own validation (e.g. rotary needs an even head size)
    return model_cfg, model_from_state_dict(model_cfg, state, device)


def read_hf_model(hf_dir: Path | str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The [model] section and the meshlm state dict (float32) of a Hugging Face model directory,
    through the adapter of the family that imports its architecture."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    adapter = adapter_for_hf(hf, source=str(hf_dir / "config.json"))
    model_cfg = adapter.config_from_hf(hf, str(hf_dir / "config.json"))
    state = adapter.state_from_hf(read_hf_tensors(hf_dir, torch.float32), model_cfg, str(hf_dir))
    check_finite(state, hf_dir)
    return model_cfg, state


def run_config_for(model_cfg: ModelConfig) -> Config:
    """The default meshlm Config with this model, data.seq_len shortened to fit; validated."""
    cfg = Config(model=model_cfg)
    cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
    validate(cfg)
    return cfg


def import_hf(hf_dir: Path | str, out_run_dir: Path | str, overwrite: bool = False) -> Path:
    """Convert a Hugging Face model directory into a meshlm run directory; returns its path.

    Everything is read and checked before `out_run_dir` is touched. A missing
    tokenizer.json is a warning: the weights are still usable for training.
    """
    hf_dir, out = Path(hf_dir), Path(out_run_dir)
    model_cfg, state = read_hf_model(hf_dir)
    cfg = run_config_for(model_cfg)
    _prepare_run_dir(out, overwrite)
    write_text_atomic(out / "config.toml", cfg.to_toml())
    save_weights(state, model_cfg, out / "model.safetensors")
    tokenizer = hf_dir / "tokenizer.json"
    if tokenizer.is_file():
        copy_file_atomic(tokenizer, out / "tokenizer.json")
    else:
        (out / "tokenizer.json").unlink(missing_ok=True)
        warnings.warn(
            f"{hf_dir} has no tokenizer.json, so {out} has no tokenizer: training from it works, but generating "
            f"text needs one. Save a fast tokenizer into {hf_dir} (AutoTokenizer.from_pretrained(...).save_pretrained) "
            f"and import again, or copy its tokenizer.json into {out}.",
            stacklevel=2,
        )
    return out


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    problem = output_dir_problem(out)
    if problem:
        raise ConfigError(f"cannot write the converted model: {problem}. Choose another output directory.")
    if (out / "config.toml").is_file() or (out / "model.safetensors").is_file():
        if not overwrite:
            raise ConfigError(
                f"{out} already holds a meshlm run. Pass overwrite=True (--overwrite) to replace it, or choose "
                f"another output directory."
            )
        clear_run_files(out)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- export


def export_hf(run_dir: Path | str, out_hf_dir: Path | str, step: int | None = None, overwrite: bool = False) -> Path:
    """Write the final model of a meshlm run as a Hugging Face model directory; returns its path.

    The result holds config.json, model.safetensors, generation_config.json and (when
    the run has one) tokenizer.json + tokenizer_config.json; `transformers` loads it
    with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    """
    if step is not None:
        raise ConfigError(
            f"exporting checkpoint step {step} is not possible yet: sharded checkpoints arrive with the checkpoint "
            f"feature. Export the final model of the run instead (leave out the step)."
        )
    run = Path(run_dir)
    cfg = load_run_config(run)
    model = load_weights(run / "model.safetensors", cfg.model)
    return write_hf_dir(
        cfg.model, model.state_dict(), out_hf_dir, tokenizer_path=run / "tokenizer.json", overwrite=overwrite
    )


def write_hf_dir(
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    out_hf_dir: Path | str,
    tokenizer_path: Path | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a meshlm state dict as a Hugging Face model directory (float32 safetensors)."""
    out = Path(out_hf_dir)
    problem = output_dir_problem(out)
    if problem:
        raise ConfigError(f"cannot write the export: {problem}. Choose another output directory.")
    existing = [p.name for p in _hf_files_in(out)] if out.is_dir() else []
    if existing and not overwrite:
        raise ConfigError(
            f"{out} already holds a Hugging Face model ({', '.join(sorted(existing)[:4])}). Pass overwrite=True "
            f"(--overwrite) to replace it, or choose another output directory."
        )
    adapter = adapter_of(cfg)
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in adapter.state_to_hf(state, cfg).items()}
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else None
    specials = _special_tokens(tok_path) if tok_path is not None and tok_path.is_file() else {}
    ids = {k: v[1] for k, v in specials.items()}
    config = adapter.config_to_hf(cfg, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"))

    out.mkdir(parents=True, exist_ok=True)
    for p in _hf_files_in(out):
        p.unlink()
    write_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_text_atomic(out / "config.json", _json(config))
    generation = {"_from_model_config": True, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}
    write_text_atomic(out / "generation_config.json", _json(generation))
    if tok_path is not None and tok_path.is_file():
        copy_file_atomic(tok_path, out / "tokenizer.json")
        tok_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        for role in ("bos", "eos"):
            if role in specials:
                tok_config[f"{role}_token"] = specials[role][0]
        write_text_atomic(out / "tokenizer_config.json", _json(tok_config))
    else:
        warnings.warn(
            f"no tokenizer.json{f' at {tok_path}' if tok_path else ''}: {out} holds the model only. Copy the "
            f"tokenizer the model was trained with into it before loading with AutoTokenizer.",
            stacklevel=2,
        )
    return out


def _hf_files_in(directory: Path) -> list[Path]:
    found = [directory / name for name in _HF_FILES if (directory / name).is_file()]
    for pattern in _HF_SHARD_GLOBS:
        found.extend(sorted(directory.glob(pattern)))
    return found


def _special_tokens(tokenizer_path: Path) -> dict[str, tuple[str, int]]:
    """bos / eos (content, id) recognised among the tokenizer's special tokens."""
    try:
        added = json.loads(tokenizer_path.read_text()).get("added_tokens") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(
            f"{tokenizer_path} is not a valid tokenizer.json ({e}); retrain or re-copy the tokenizer."
        ) from None
    by_name = {t["content"]: t["id"] for t in added if isinstance(t, dict) and t.get("special")}
    found: dict[str, tuple[str, int]] = {}
    for role, names in (("eos", _EOS_NAMES), ("bos", _BOS_NAMES)):
        for name in names:
            if name in by_name:
                found[role] = (name, by_name[name])
                break
    return found


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


__all__ = ["load_hf_model", "import_hf", "export_hf", "write_hf_dir", "run_config_for"]
