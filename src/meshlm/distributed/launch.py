"""`meshlm train --nproc N`: start N local workers through torch.distributed.run.

The workers run under the same elastic agent as `torchrun`, so `--max-restarts`,
worker monitoring and the environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...)
are exactly what a torchrun launch gives; a multi-node run uses torchrun itself with
the unchanged `-m meshlm train ...` command line.
"""

from __future__ import annotations

import os
import sys

from meshlm.config import ConfigError


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
    return tuple(_LAUNCHER_DEFAULTS)


def run_launcher(nproc: int, worker_argv: list[str], max_restarts: int = 0) -> None:
    """Run `python -m meshlm <worker_argv>` on `nproc` local processes under torch.distributed.run's
    elastic agent. Raises torchelastic's ChildFailedError when a worker fails (its `failures` hold
    each rank's recorded exception) and SignalException when this process is signalled (the agent
    has stopped the workers by then)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}.")
    from torch.distributed.run import parse_args, run

    for key, value in _LAUNCHER_DEFAULTS.items():
        os.environ.setdefault(key, value)
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
    """Run `python -m meshlm <worker_argv>` on `nproc` local processes; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run_launcher(nproc, worker_argv, max_restarts)
    except ChildFailedError as e:
        failures = "; ".join(f"rank {rank} exited with {f.exitcode}" for rank, f in e.failures.items())
        print(f"meshlm: error: a worker failed ({failures}); its output above says why.", file=sys.stderr)
        return 1
    return 0
