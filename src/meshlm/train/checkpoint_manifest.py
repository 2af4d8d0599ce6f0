"""Checkpoint directories: atomic publication, the manifest, verification, retention.

    RUN/checkpoints/step-000200.tmp/   being written (never loaded; removed by the next save)
    RUN/checkpoints/step-000200/       complete: renamed from .tmp after manifest.json was written
        .metadata, __0_0.distcp, ...     torch.distributed.checkpoint files (one data file per rank)
        config.toml, tokenizer.json      what `meshlm export` needs besides the weights
        manifest.json                    written last: step, layout, config hash, every other
                                         file's size and sha256

A directory counts as a checkpoint only under its final name and only with a manifest whose
sizes and checksums match every file; anything else (a crash during a save, a truncated copy,
a flipped bit) is refused with a message naming the bad file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.utils.file_hash import file_sha256

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or corrupt (a user-facing error)."""


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def step_dir(run: Path, step: int) -> Path:
    return checkpoints_dir(run) / f"step-{step:06d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Published checkpoint directories (final names), oldest first; not yet verified."""
    root = checkpoints_dir(run)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, info: dict) -> dict:
    """Write the manifest (last, fsynced) into `tmp`, then rename `tmp` to `final` (atomic on
    POSIX). Returns the manifest."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": FORMAT, **info, "files": files}
    part = tmp / (MANIFEST + ".part")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)
    if final.exists():  # the same step saved again (a restarted run): the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return manifest


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.name.endswith(".tmp"):
        raise CheckpointError(
            f"{path} is a checkpoint that was still being written (a .tmp directory); it is incomplete."
        )
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: its save did not finish, so it is incomplete.")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"], manifest["step"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({e}).") from None
    return manifest


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the first bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: file {name} is missing.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: file {name} has {size} bytes, the manifest "
                f"records {expected['bytes']} (truncated or overwritten)."
            )
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: file {name} does not match its sha256 in the manifest."
            )
    return manifest


def newest_valid(run: Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint of `run` that verifies, skipping (and reporting) broken ones."""
    for _, path in reversed(list_checkpoints(run)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            log(f"skipping {path.name}: {e}")
    return None


def prune(run: Path, keep: int, keep_paths: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep` published checkpoints (0 keeps all) and leftover .tmp
    directories of interrupted saves. Returns what was deleted."""
    root = checkpoints_dir(run)
    removed = []
    published = list_checkpoints(run)
    doomed = [p for _, p in published[:-keep]] if keep else []
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.name.endswith(".tmp") and p.is_dir()]
    for path in doomed:
        if path not in keep_paths:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _newest_other_valid(run: Path, bad: Path) -> tuple[int, Path] | None:
    for step, path in reversed(list_checkpoints(run)):
        if path.resolve() == bad.resolve():
            continue
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return step, path
    return None


def fallback_hint(bad: Path, command: str) -> str:
    """The next step after a checkpoint is refused: the newest other checkpoint of its run that
    verifies (what `--resume auto` or an export without --step would take), if any."""
    bad = Path(bad)
    if bad.parent.name != "checkpoints":
        return "Use another checkpoint."
    run = bad.parent.parent
    other = _newest_other_valid(run, bad)
    if other is None:
        return f"No other checkpoint of {run} verifies; train again without --resume."
    step, path = other
    if command == "export":
        return f"Export another step instead: {path} (step {step}) verifies (meshlm export --run {run} --step {step})."
    return (
        f"The newest checkpoint that verifies is {path} (step {step}): resume from it (--resume {path}), or with "
        f"--resume auto and --out {run}, which skips the damaged one."
    )
