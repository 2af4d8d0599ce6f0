"""The run directory: resolved config, metrics, curves and the final model.

DIR/config.toml        the resolved configuration of the run
DIR/metrics.jsonl      one JSON object per training step / evaluation
DIR/loss.png           training and validation curves
DIR/model.safetensors  final weights (full, unsharded)
DIR/model.safetensors.manifest.json   its size and sha256 (weights_manifest.py)
DIR/tokenizer.json     the tokenizer the data was prepared with
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

from meshlm.config import Config, ConfigError, config_from_dict
from meshlm.utils.paths import output_dir_problem

RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "loss.png",
    "model.safetensors",
    "model.safetensors.manifest.json",
    "tokenizer.json",
    "state_bytes.json",
)


def check_run_dir(out: Path, cfg: Config, overwrite: bool) -> None:
    """Refuse, before any work, an --out that cannot be written or that holds another run. A
    directory where a run started but never completed a step (a crash, a bad value found late)
    holds nothing to protect and is reused without --overwrite."""
    problem = output_dir_problem(out)
    if problem:
        raise ConfigError(f"cannot write the run directory: {problem}. Choose another --out.")
    existing = out / "config.toml"
    if existing.is_file() and not overwrite and run_has_progress(out):
        try:
            old = config_from_dict(tomllib.loads(existing.read_text()))
        except (ConfigError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            old = None
        if old is None or old.fingerprint() != cfg.fingerprint():
            raise ConfigError(
                f"output directory {out} already holds a different run (its config.toml differs from this one). "
                f"Pass --overwrite to replace it, or choose another --out."
            )


def run_has_progress(out: Path) -> bool:
    """Did a run in `out` complete at least one training step (a logged step, a checkpoint, a
    final model)?"""
    out = Path(out)
    if (out / "model.safetensors").is_file():
        return True
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in checkpoints.iterdir()):
        return True
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    if "loss" in json.loads(line):
                        return True
                except (json.JSONDecodeError, TypeError):
                    continue
    return False


def init_run_dir(out: Path, cfg: Config, overwrite: bool) -> None:
    """Create `out` (once the data is known to be usable) and write the resolved config."""
    check_run_dir(out, cfg, overwrite)
    if overwrite and out.is_dir():
        clear_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun of the same config starts its metrics afresh.
    (out / "metrics.jsonl").unlink(missing_ok=True)
    write_text_atomic(out / "config.toml", cfg.to_toml())


def clear_run_files(out: Path) -> None:
    """Remove what a run leaves in `out` (its files and checkpoints), nothing else."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` at `path` through a temporary file that never outlives a failed write."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_file_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_run_config(run: Path) -> Config:
    path = Path(run) / "config.toml"
    if not path.is_file():
        raise ConfigError(
            f"{run} is not a meshlm run directory (no config.toml). Pass the --out directory of `meshlm train`."
        )
    return config_from_dict(tomllib.loads(path.read_text()), source=str(path))
