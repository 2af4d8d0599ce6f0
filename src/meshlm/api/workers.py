"""Running a `meshlm` command on N worker processes from Python, as `--nproc N` does.

`run_workers(n, argv)` starts `python -m meshlm <argv>` on n local ranks through
torch.distributed.run (meshlm.distributed.launch, the launcher of `meshlm train --nproc`),
from a script or a Jupyter kernel alike: the workers are fresh interpreters, so the caller
needs no `if __name__ == "__main__"` guard. What the API adds around the launcher:

- a failed worker is re-raised here with its rank and message (torchelastic's error files,
  written by the `meshlm` entry point): a ConfigError stays a ConfigError, anything else
  becomes a WorkerError carrying the worker's traceback;
- Ctrl-C (SIGINT) stops every worker (the elastic agent's shutdown) and is re-raised as
  KeyboardInterrupt; the caller's own signal handlers and environment are restored after,
  so a Jupyter kernel keeps its interrupt behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal

from meshlm.config import ConfigError
from meshlm.distributed.launch import launcher_environment, run_launcher

# Signals torchelastic's process context takes over while workers run.
_HANDLED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


class WorkerError(RuntimeError):
    """A worker process failed: `rank`, its `message` and its `traceback` (as the worker saw it)."""

    def __init__(self, rank: int, message: str, traceback: str = ""):
        self.rank, self.message, self.traceback = rank, message, traceback
        detail = f"\n\nworker traceback (rank {rank}):\n{traceback}" if traceback else ""
        super().__init__(f"worker rank {rank} failed: {message}{detail}")


@contextlib.contextmanager
def _caller_state_kept():
    """Restore this process's signal handlers and launcher variables after the launch."""
    handlers = {}
    for name in _HANDLED_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            with contextlib.suppress(ValueError):  # not the main thread: torchelastic leaves them alone too
                handlers[sig] = signal.getsignal(sig)
    # The launcher's defaults, and the variable torch.distributed.run's agent sets in its own process.
    saved = {k: os.environ.get(k) for k in (*launcher_environment(), "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_workers(nproc: int, argv: list[str]) -> None:
    """Run `meshlm <argv>` on `nproc` local worker processes; raise what a worker raised."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with _caller_state_kept():
        try:
            run_launcher(nproc, argv)
        except SignalException as e:
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise
        except ChildFailedError as e:
            raise _worker_exception(e) from None
        finally:
            # The agent's rendezvous TCPStore ends up in a reference cycle, its server thread
            # alive until the cycle is collected. Collect it here: a process forked from this one
            # before that would inherit the store without the thread, and hang destroying it.
            gc.collect()


def _worker_exception(error) -> BaseException:
    """The root cause among the failed ranks: one that recorded an exception, earliest first
    (the others were usually stopped by the agent because of it)."""
    failures = sorted(error.failures.items(), key=lambda kv: (not _recorded(kv[1]), kv[1].timestamp, kv[0]))
    rank, failure = failures[0]
    if not _recorded(failure):
        return WorkerError(rank, f"exited with code {failure.exitcode} ({failure.message}); its output above says why")
    # The error file holds {"message": {"message": "Type: text", "extraInfo": {"py_callstack": ...}}}
    # (torchelastic's ErrorHandler), or {"message": "text"} from other writers.
    data = failure.error_file_data.get("message", {})
    message = str(data.get("message", "") if isinstance(data, dict) else data)
    trace = data.get("extraInfo", {}).get("py_callstack", "") if isinstance(data, dict) else ""
    kind, _, text = message.partition(": ")
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if kind in ("ConfigError", "DataError"):
        return ConfigError(f"worker rank {rank}: {text}")
    return WorkerError(rank, message, trace)


def _recorded(failure) -> bool:
    data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    return bool(data)
