"""Work that only global rank 0 does (read files, plan, choose a checkpoint), with its answer
or its error delivered to every rank, so that no rank waits forever for a peer that gave up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from meshlm.config import ConfigError
from meshlm.utils.errors import REPORTED_BY_RANK0, RunError


def broadcast_from_rank0(value: Any, distributed: bool) -> Any:
    """Rank 0's `value` on every rank (picklable objects; a no-op in a single process)."""
    if not distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reported_once(error: BaseException, rank: int) -> BaseException:
    """`error`, which every rank raises alike (a global decision), marked on the ranks other than
    0 so that only rank 0 prints it."""
    if rank != 0:
        setattr(error, REPORTED_BY_RANK0, True)
    return error


def run_on_rank0(
    fn: Callable[[], Any], distributed: bool, errors: tuple[type[Exception], ...] = (ConfigError, RunError)
) -> Any:
    """fn() on rank 0 only; its result on every rank. An error of the types in `errors` raised
    there is raised again, with the same type and message, on every rank (marked
    REPORTED_BY_RANK0 on the others). In a single process this is fn()."""
    if not distributed:
        return fn()
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except errors as e:
            outcome = ("error", (type(e), str(e)))
    kind, payload = broadcast_from_rank0(outcome, distributed)
    if kind == "error":
        error_type, message = payload
        raise reported_once(error_type(message), dist.get_rank())
    return payload
