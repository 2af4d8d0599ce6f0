"""Run a function on N local ranks over gloo, forked from the calling process (tests, benchmarks).

Forking from a process that already imported torch starts ranks in well under a second
(a torchrun subprocess per case costs ~4 s), so each test groups its cases per world.
The child sets the same variables torchrun sets, so the code under test reads them
through meshlm.distributed.env as it would in production.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, queue, args):
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "MESHLM_DEVICE": "cpu",
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, *args)
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        # Skip interpreter teardown: gloo's threads may abort it (see process_group.shutdown_distributed).
        os._exit(0)


def _start_method() -> str:
    """fork, unless this process has initialised CUDA (on a GPU machine, after a test that ran
    on the GPU): a forked child cannot use the parent's CUDA context, and even CPU-only code
    (the optimizer's graph-capture check) queries it. spawn then starts clean interpreters;
    `fn` and its arguments must be importable / picklable, as module-level test functions are."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return "spawn"
    return "fork"


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run fn(rank, *args) on `world_size` forked ranks; return the results ordered by rank.
    Any rank's exception fails the call with that rank's traceback."""
    ctx = mp.get_context(_start_method())
    # Garbage in reference cycles is finalised here, not in the forked children: an object that
    # owns a thread (a TCPStore's server) would hang a child that destroys it without the thread.
    gc.collect()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args), daemon=True) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
