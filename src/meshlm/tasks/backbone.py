"""Where a task model's backbone comes from: a meshlm run, a Hugging Face directory, or the
default backbone (pretrained once, cached, reused: default_backbone.py).

A backbone source is a run directory: config.toml ([model] is the backbone), model.safetensors
and tokenizer.json. Its weights are loaded into the task model's `backbone`, all but the output
layer, which a task model does not have.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from meshlm.artifacts.run_dir import load_run_config
from meshlm.config import Config, ConfigError
from meshlm.model.registry import family_spec


def check_backbone_run(run: Path) -> Config:
    cfg = load_run_config(run)
    for name in ("model.safetensors", "tokenizer.json"):
        if not (run / name).is_file():
            raise ConfigError(
                f"--from {run}: no {name} there; a backbone is a finished run directory of `meshlm train` "
                f"(config.toml, model.safetensors, tokenizer.json)."
            )
    return cfg


def converted_hf_run(hf_dir: Path, cache_dir: Path) -> Path:
    """A meshlm run directory for a Hugging Face model, converted once into the cache (keyed by
    the directory's files), so every rank of a launch finds it."""
    from meshlm.interop.convert import import_hf
    from meshlm.interop.hf_files import hf_weight_files

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--init-from-hf {hf_dir}: no config.json there; pass a local Hugging Face model directory.")
    files = [hf_dir / "config.json", *hf_weight_files(hf_dir)]
    key = hashlib.sha256("|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode())
    out = Path(cache_dir) / "hf-backbones" / key.hexdigest()[:16]
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        import_hf(hf_dir, staging, overwrite=True)
        if not (staging / "tokenizer.json").is_file():
            raise ConfigError(
                f"--init-from-hf {hf_dir}: no tokenizer.json there; a task model needs the model's tokenizer."
            )
        try:
            staging.rename(out)
        except OSError:  # another rank got there first
            pass
    return out


@torch.no_grad()
def load_backbone_weights(task_model: torch.nn.Module, weights: Path) -> list[str]:
    """Copy a backbone run's weights into `task_model.backbone`; returns the backbone parameters
    the file did not have (new modules, e.g. a bidirectional variant's backward direction),
    which keep their initialisation."""
    cfg = task_model.cfg.backbone
    output = family_spec(cfg).last_stage[-1]
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith(output + ".")}
    expected = task_model.backbone.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    unexpected = sorted(set(state) - set(expected))
    if bad or unexpected:
        raise ConfigError(
            f"backbone weights {weights} do not fit the backbone's [model] section (shape mismatches {bad[:3]}, "
            f"unexpected {unexpected[:3]}); do not change the backbone's sizes with --set."
        )
    task_model.backbone.load_state_dict(state, strict=False)
    task_model.backbone.tie_weights()
    return sorted(k for k in set(expected) - set(state) if not k.startswith(output + "."))
