"""Starting and stopping the default process group and the mesh."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from meshlm.distributed.env import LaunchEnv
from meshlm.distributed.peer_errors import publish_node


def init_distributed(env: LaunchEnv, timeout_s: float = 600.0) -> None:
    """Create the default process group (nccl on CUDA, gloo on CPU) when launched with >1 process."""
    if not env.distributed or dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(
        backend=env.backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=env.device if env.device.type == "cuda" else None,
    )
    # Where this rank's collectives live, so that a failure caused by another node can name it.
    publish_node(env)


def shutdown_distributed(exit_process: bool = False, code: int = 0) -> None:
    """Leave the process group cleanly. gloo can abort with `terminate called without an active
    exception` while its threads are torn down after destroy_process_group(); a barrier first
    makes every rank finish its collectives, and `exit_process` then leaves with os._exit(code)
    after flushing, so a finished run always exits with its code whatever the C++ destructors do."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    if exit_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_now_if_distributed(code: int) -> None:
    """After an error or an interrupt in a worker: leave with `code` through os._exit (after
    flushing) when a process group exists, as shutdown_distributed does, so that gloo's
    threads cannot turn the exit into an abort with a C++ message."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
