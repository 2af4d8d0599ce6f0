"""`train.profile_comm`'s timing (distributed/comm_profile.py): exposed communication is the time a
rank is blocked in a collective (a blocking call, or the wait of an asynchronous one), compute is
the rest of the step, imbalance the spread of compute over the ranks. Two real gloo ranks, one of
which computes (sleeps) longer before the collectives; the other must show the difference as
exposed communication, and both the same imbalance."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from meshlm.distributed.comm_profile import CommProfiler
from meshlm.distributed.spawn import run_distributed

SLOW = 0.4  # seconds rank 1 computes longer than rank 0


def _step(rank: int) -> dict:
    x = torch.ones(1024)
    dist.barrier()
    with CommProfiler({}) as prof:
        started = time.perf_counter()
        # overlapped: launched, then waited for after more work than it takes -> hardly exposed
        work = dist.all_reduce(x.clone(), async_op=True)
        time.sleep(0.1)
        work.wait()
        time.sleep(SLOW if rank == 1 else 0.0)  # rank 1's extra compute
        dist.all_reduce(x)  # rank 0 waits here for rank 1
        step_s = time.perf_counter() - started
    return prof.timing(step_s) | {"mine": prof.exposed_s, "step_s": step_s}


def test_exposed_communication_and_imbalance_across_ranks():
    fast, slow = run_distributed(_step, 2)
    assert fast["imbalance_s"] == slow["imbalance_s"]  # the same figures on every rank
    assert fast["mine"] >= 0.75 * SLOW  # rank 0 waited for rank 1 in the blocking all-reduce
    assert slow["mine"] < 0.5 * SLOW  # rank 1 hardly waited: its async all-reduce was overlapped
    assert fast["exposed_comm_s_max"] == max(fast["mine"], slow["mine"])
    assert 0.75 * SLOW <= fast["imbalance_s"] <= 1.5 * SLOW
    assert fast["compute_s_max"] >= SLOW + 0.1 - 1e-3
