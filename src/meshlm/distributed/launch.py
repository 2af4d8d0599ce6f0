"""`meshlm train --nproc N` (and predict / eval / generate): start N local workers through
torch.distributed.run.

The workers run under the same elastic agent as `torchrun`, so `--max-restarts`,
worker monitoring and the environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...)
are exactly what a torchrun launch gives; a multi-node run uses torchrun itself with
the unchanged `-m meshlm train ...` command line.

Faults, as the user sees them (docs/reliability.md):

- Ctrl-C or SIGTERM: the agent forwards the signal to every worker, waits for them (and kills
  what is left after its grace period), and this launcher raises KeyboardInterrupt /
  Terminated, so the command prints one line and exits 130 / 143. Workers started here stay
  quiet about it (MESHLM_LAUNCHER tells them so): one line, not one per worker.
- A worker that fails: it printed its own message; the exit code is passed on (2 when every
  failed worker found a user error, else 1), with one line naming a worker killed by a signal.
- The agent's own warnings (one per worker and signal) are not shown; its error lines are.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from meshlm.config import ConfigError
from meshlm.distributed.env import LAUNCHER_VARIABLE, accelerator
from meshlm.utils.errors import EXIT_FAILURE, EXIT_USER_ERROR, Terminated


def strip_launch_args(argv: list[str]) -> list[str]:
    """The worker command line: the user's arguments without the launcher's own options."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if arg.startswith("--nproc=") or arg.startswith("--max-restarts="):
            continue
        out.append(arg)
    return out


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_nproc(nproc: int | None, flag: str = "--nproc", max_restarts: int = 0) -> None:
    """Refuse a worker count below 1 (and negative restarts) before anything else runs."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"{flag} must be at least 1 (the number of worker processes), got {nproc}.")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be zero or positive, got {max_restarts}.")


def oversubscription_warning(nproc: int) -> str | None:
    """One line when more workers than devices (GPUs) or cores share the machine: allowed (it
    is how a layout is tried on a laptop), but every step then waits for the slowest worker."""
    gpus = accelerator()
    if gpus is not None:
        if nproc <= gpus.count:
            return None
        return (
            f"meshlm: warning: {nproc} workers share {gpus.count} GPU(s): workers on one GPU take turns and split its "
            f"memory; use --nproc {gpus.count} for speed."
        )
    cores = cpu_cores()
    if nproc <= cores:
        return None
    return (
        f"meshlm: warning: {nproc} workers on {cores} CPU core(s): each core runs about {nproc / cores:.1f} workers "
        f"in turn, so steps take about {nproc / cores:.1f}x longer than the same work on {cores} and the machine stays "
        f"busy meanwhile; fine for trying a layout, use --nproc {cores} or fewer for speed."
    )


# Variables the launcher sets in this process when unset (see run_launcher).
_LAUNCHER_DEFAULTS = {
    # One thread per worker unless the user says otherwise: N workers each spawning a
    # thread per core would oversubscribe the CPU many times over.
    "OMP_NUM_THREADS": "1",
    # torch 2.13's agent shares one TCPStore across restart rounds, but workers no longer prefix
    # their keys per attempt: restarted workers read the dead ones' gloo addresses and fail to
    # connect. Without sharing, every round gets a fresh store (so --max-restarts works).
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
}


def launcher_environment() -> tuple[str, ...]:
    """The variables run_launcher may set in the calling process (a caller that lives on, the
    Python API, restores them)."""
    return (*_LAUNCHER_DEFAULTS, LAUNCHER_VARIABLE)


def run_launcher(nproc: int, worker_argv: list[str], max_restarts: int = 0) -> None:
    """Run `python -m meshlm <worker_argv>` on `nproc` local processes under torch.distributed.run's
    elastic agent. Raises torchelastic's ChildFailedError when a worker fails (its `failures` hold
    each rank's recorded exception) and SignalException when this process is signalled (the agent
    has stopped the workers by then)."""
    check_nproc(nproc, max_restarts=max_restarts)
    from torch.distributed.run import parse_args, run

    warning = oversubscription_warning(nproc)
    if warning:
        print(warning, file=sys.stderr)
    for key, value in _LAUNCHER_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ[LAUNCHER_VARIABLE] = "1"
    _quiet_agent_warnings()
    args = parse_args(
        [
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--max-restarts",
            str(max_restarts),
            "--module",
            "meshlm",
        ]
    )
    # The worker's arguments are set after parsing: torch.distributed.run's parser would read
    # a worker option such as --run as an abbreviation of its own --run-path.
    args.training_script_args = list(worker_argv)
    run(args)


def launch_local(nproc: int, worker_argv: list[str], max_restarts: int = 0) -> int:
    """Run `python -m meshlm <worker_argv>` on `nproc` local processes; returns the exit code.
    Raises KeyboardInterrupt / Terminated when interrupted, after every worker has stopped."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run_launcher(nproc, worker_argv, max_restarts)
    except SignalException as e:  # the agent has stopped every worker by now
        if e.sigval == signal.SIGTERM:
            raise Terminated() from None
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt() from None
        print(f"meshlm: stopped by {e.sigval.name}; every worker was stopped.", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return _failure_code({rank: f.exitcode for rank, f in e.failures.items()})
    return 0


def _quiet_agent_warnings() -> None:
    """The elastic agent logs a warning per worker and signal at shutdown (and sets a level on
    each of its loggers, so the parent's level is not enough); its errors stay visible."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _failure_code(codes: dict[int, int]) -> int:
    """The launcher's exit code for failed workers (each printed its own message)."""
    killed = {rank: code for rank, code in codes.items() if code < 0}
    if killed:
        names = []
        for rank, code in sorted(killed.items()):
            try:
                names.append(f"rank {rank} by {signal.Signals(-code).name}")
            except ValueError:
                names.append(f"rank {rank} by signal {-code}")
        print(
            f"meshlm: error: a worker was killed ({', '.join(names)}), by the system (out of memory?) or from "
            f"outside; the others were stopped. Pass --max-restarts R to restart the workers after such a loss "
            f"(training resumes from its newest checkpoint).",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if set(codes.values()) == {EXIT_USER_ERROR}:
        return EXIT_USER_ERROR
    return EXIT_FAILURE
