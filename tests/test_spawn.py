"""run_distributed forks its ranks from the calling process: garbage the caller still holds in a
reference cycle must not reach them. A TCPStore (its server runs on a thread of its own) that a
forked rank destroys hangs that rank for good, joining a thread the fork did not copy."""

from __future__ import annotations

import gc

from torch.distributed import TCPStore

from meshlm.distributed.spawn import free_port, run_distributed


def _collect(rank: int) -> int:
    gc.collect()  # would destroy an inherited store
    return rank


def test_a_store_left_in_a_reference_cycle_does_not_hang_the_ranks():
    gc.disable()  # keeps the cycle alive until run_distributed, as a busy caller's would be
    try:
        cycle: list = [TCPStore("127.0.0.1", free_port(), 1, is_master=True)]
        cycle.append(cycle)
        del cycle
        assert run_distributed(_collect, 2, timeout=60) == [0, 1]
    finally:
        gc.enable()
