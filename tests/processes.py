"""Finding and signalling the processes a command started (tests only): the worker of a given
rank among a launcher's descendants, read from /proc."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/*/stat)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def descendants_of(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def environment_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The descendant of `launcher_pid` that runs as distributed rank `rank` (its RANK variable)."""
    for pid in descendants_of(launcher_pid):
        if environment_of(pid).get("RANK") == str(rank):
            return pid
    return None


def kill_worker(launcher_pid: int, rank: int, sig: int = signal.SIGKILL) -> int:
    pid = worker_pid(launcher_pid, rank)
    if pid is None:
        raise AssertionError(f"no worker of rank {rank} under process {launcher_pid}")
    os.kill(pid, sig)
    return pid
