"""The default backbone of `meshlm finetune` (no --from, no --init-from-hf): the built-in
tiny-cpu language model (llama, 4 layers, d_model 128, a 2048-token byte-level BPE), pretrained
once on the default corpus (the Python standard library's text: its docstrings and comments are
English prose, its code the rest), cached under data.cache_dir and reused by every later
fine-tuning run. docs/tasks.md says why this one and what it costs.

The cache folder is named by a hash of the pretraining config (less the cache's location) and
the Python version (the corpus), so a changed default retrains instead of reusing a stale model; a half-written
backbone is never used (it is trained into a temporary folder, then renamed).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from meshlm.config import load_config

PRETRAIN = [
    "train.steps=800",
    "train.eval_every=200",
    "train.sample_tokens=0",
    "train.checkpoint_every=0",
]


def default_backbone_config(cache_dir: Path):
    return load_config("tiny-cpu", PRETRAIN + [f'data.cache_dir="{cache_dir}"'])


def default_backbone_dir(cache_dir: Path) -> Path:
    """Where the default backbone lives under `cache_dir`. The key hashes the pretraining config
    without the cache's own location, so the same cache reached by another path (relative from
    another working directory, or absolute) finds the backbone instead of training a second one."""
    recipe = load_config("tiny-cpu", PRETRAIN).to_toml()  # data.cache_dir left at its default
    key = hashlib.sha256((recipe + sys.version.split()[0]).encode()).hexdigest()[:12]
    return Path(cache_dir) / "backbones" / f"default-{key}"


def default_backbone(cache_dir: Path, log=print) -> Path:
    """The default backbone's run directory, pretrained on first use (single process)."""
    cfg = default_backbone_config(Path(cache_dir))
    out = default_backbone_dir(Path(cache_dir))
    if (out / "model.safetensors").is_file():
        return out
    from meshlm.train.trainer import train

    log(f"finetune: pretraining the default backbone once (tiny-cpu on the Python standard library) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    cfg.train.progress = sys.stderr.isatty()
    train(cfg, staging, overwrite=True, log=log)
    try:
        staging.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return out
