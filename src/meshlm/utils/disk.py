"""Free space and full disks: check before a large write, recognise a write that ran out of space.

A full disk rarely says so plainly: torch.save reports "unexpected pos 704 vs 598", a
checkpoint writer wraps the OSError of another rank. So a save checks the free space against
the size it is about to write first, and after a failed write, `out_of_space` asks the
filesystem rather than the exception.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from meshlm.utils.errors import DiskFullError

MiB = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def existing_ancestor(path: Path) -> Path:
    """`path` itself or the nearest directory above it that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the filesystem that holds (or would hold) `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def disk_full_message(path: Path, need: int, free: int | None = None) -> str:
    free = free_bytes(path) if free is None else free
    return f"disk full at {path}: need {mib(need)} MiB, {mib(free)} MiB free."


def check_free_space(path: Path, need: int, then: str = "") -> None:
    """DiskFullError ("disk full at PATH: need N MiB, M free." + `then`) when fewer than `need`
    bytes are free where `path` will be written."""
    free = free_bytes(path)
    if free < need:
        raise DiskFullError(disk_full_message(path, need, free) + (" " + then if then else ""))


def out_of_space(error: BaseException | None, path: Path, need: int = 0) -> bool:
    """Did a failed write of about `need` bytes at `path` run out of space? True when the error
    (or one it wraps) is ENOSPC / EDQUOT, or when the filesystem now has less than `need` free."""
    if any(_says_no_space(e) for e in _chain(error)):
        return True
    try:
        return free_bytes(path) < max(need, 1)
    except OSError:
        return False


def _says_no_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _chain(error: BaseException | None, depth: int = 0) -> list[BaseException]:
    """`error`, the errors it was raised from, and those a checkpoint writer collected from
    several ranks (torch's CheckpointException keeps (exception, traceback) per rank)."""
    if error is None or depth > 10:
        return []
    found = [error]
    for inner in (error.__cause__, error.__context__):
        found += _chain(inner, depth + 1)
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for value in failures.values():
            inner = value[0] if isinstance(value, tuple) and value else value
            if isinstance(inner, BaseException):
                found += _chain(inner, depth + 1)
    return found
