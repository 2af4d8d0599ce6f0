"""The run directory: resolved config, metrics, curves and the final model.

DIR/config.toml        the resolved configuration of the run
DIR/metrics.jsonl      one JSON object per training step / evaluation
DIR/loss.png           training and validation curves
DIR/model.safetensors  final weights (full, unsharded)
DIR/tokenizer.json     the tokenizer the data was prepared with
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from meshlm.config import Config, ConfigError, config_from_dict

RUN_FILES = ("config.toml", "metrics.jsonl", "loss.png", "model.safetensors", "tokenizer.json")


def check_run_dir(out: Path, cfg: Config, overwrite: bool) -> None:
    """Refuse, before any work, to mix two different runs in one directory."""
    existing = out / "config.toml"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another --out.")
    if existing.is_file() and not overwrite:
        try:
            old = config_from_dict(tomllib.loads(existing.read_text()))
        except (ConfigError, tomllib.TOMLDecodeError):
            old = None
        if old is None or old.fingerprint() != cfg.fingerprint():
            raise ConfigError(
                f"output directory {out} already holds a different run (its config.toml differs from this one). "
                f"Pass --overwrite to replace it, or choose another --out."
            )


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def copy_file_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def load_run_config(run: Path) -> Config:
    path = Path(run) / "config.toml"
    if not path.is_file():
        raise ConfigError(
            f"{run} is not a meshlm run directory (no config.toml). Pass the --out directory of `meshlm train`."
        )
    return config_from_dict(tomllib.loads(path.read_text()), source=str(path))
