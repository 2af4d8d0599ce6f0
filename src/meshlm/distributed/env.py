"""The only place that reads the launch environment (RANK, LOCAL_RANK, WORLD_SIZE, ...).

Everything else receives a `LaunchEnv` (or values derived from it) explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl" on CUDA, "gloo" otherwise
    # TORCHELASTIC_RESTART_COUNT: > 0 when the elastic agent (--max-restarts) restarted the workers.
    restart_count: int = 0
    # MESHLM_TEST_KILL_AT_STEP (tests only): "N" makes the last rank SIGKILL itself before step N,
    # "N:save" while the checkpoint of step N is being saved (see meshlm.train.checkpoint).
    test_kill_at_step: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cuda_available() -> bool:
    return torch.cuda.is_available()


def read_launch_env() -> LaunchEnv:
    """Rank and world size as set by torch.distributed.run / torchrun (defaults: one process).
    CUDA when present (one device per local rank, NCCL), else CPU with gloo.
    MESHLM_DEVICE=cpu forces the CPU even where a GPU exists."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    want_cpu = os.environ.get("MESHLM_DEVICE", "").lower() == "cpu"
    # want_cpu first: a forked CPU rank must not touch CUDA at all (its parent may hold a context).
    if not want_cpu and cuda_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    test_kill = os.environ.get("MESHLM_TEST_KILL_AT_STEP", "")
    return LaunchEnv(rank, local_rank, world_size, device, backend, restart_count, test_kill)
