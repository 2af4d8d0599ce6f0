"""A manifest beside every weights file meshlm writes, verified when the file is loaded.

    model.safetensors                 the weights
    model.safetensors.manifest.json   {"format": 1, "producer": "meshlm",
                                       "files": {"model.safetensors": {"bytes": N, "sha256": H}}}

The same kind of record a training checkpoint's manifest.json keeps for each of its files: a
file altered in place, truncated or half-copied no longer matches and is refused by name. The
size is always checked (free); the sha256 reads the whole file once, which `verify=False`
(`--no-verify`) skips for very large files. A weights file without a manifest (written by
another tool, or by an older meshlm) loads unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.utils.file_hash import file_sha256

FORMAT = 1
SUFFIX = ".manifest.json"


def manifest_path(weights: Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name + SUFFIX)


def file_mode() -> int:
    """The mode a plain open() would give a new file (0644 under the usual umask 022): files
    written through a temporary file (mkstemp: 0600, safetensors: 0600) get it explicitly."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_manifest(weights: Path, sha256: str | None = None) -> dict:
    """Record `weights`' size and sha256 (computed unless given) in its manifest, atomically."""
    weights = Path(weights)
    record = {"bytes": weights.stat().st_size, "sha256": sha256 or file_sha256(weights)}
    manifest = {"format": FORMAT, "producer": "meshlm", "files": {weights.name: record}}
    target = manifest_path(weights)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def read_manifest(weights: Path) -> dict | None:
    path = manifest_path(weights)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        record = manifest["files"][Path(weights).name]
        int(record["bytes"]), str(record["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path} is unreadable ({type(e).__name__}: {e}), so {weights} cannot be checked. Delete the manifest "
            f"to load the weights unchecked, or re-export the model."
        ) from None
    return manifest


def verify_weights_file(weights: Path, verify: bool = True) -> dict | None:
    """The manifest of `weights` after checking the file against it (size always, sha256 when
    `verify`); None when it has no manifest. ConfigError naming the file otherwise."""
    weights = Path(weights)
    manifest = read_manifest(weights)
    if manifest is None:
        return None
    record = manifest["files"][weights.name]
    size = weights.stat().st_size
    if size != record["bytes"]:
        raise ConfigError(
            f"model weights {weights} are corrupt: {size} bytes, its manifest {manifest_path(weights).name} records "
            f"{record['bytes']} (truncated, or replaced by another file). Copy or export the model again."
        )
    if verify and file_sha256(weights) != record["sha256"]:
        raise ConfigError(
            f"model weights {weights} do not match the sha256 in {manifest_path(weights).name}: the file was "
            f"altered or damaged after it was written. Copy or export the model again (or pass --no-verify to load "
            f"it anyway, at your own risk)."
        )
    return manifest


def weights_sha256(weights: Path) -> str:
    """The sha256 of a weights file: from its manifest when it has one (after the size check),
    else computed."""
    manifest = verify_weights_file(weights, verify=False)
    return manifest["files"][Path(weights).name]["sha256"] if manifest else file_sha256(Path(weights))
