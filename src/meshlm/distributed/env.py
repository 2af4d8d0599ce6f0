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
    # LOCAL_WORLD_SIZE: processes on this node (torchrun sets it; 0 when not launched by it).
    local_world_size: int = 0

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
    want_cpu = cpu_forced()
    # want_cpu first: a forked CPU rank must not touch CUDA at all (its parent may hold a context).
    if not want_cpu and cuda_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    return LaunchEnv(rank, local_rank, world_size, device, backend, restart_count, local_world_size)


def cpu_forced() -> bool:
    """MESHLM_DEVICE=cpu: run on the CPU even where a GPU exists."""
    return os.environ.get("MESHLM_DEVICE", "").lower() == "cpu"


@dataclass(frozen=True)
class Accelerator:
    """The GPUs this process would use: the first device's name and memory, and how many."""

    name: str
    memory_bytes: int
    count: int


def accelerator() -> Accelerator | None:
    """The CUDA devices training would run on, or None on the CPU (no GPU, or MESHLM_DEVICE=cpu)."""
    if cpu_forced() or not cuda_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Accelerator(props.name, props.total_memory, torch.cuda.device_count())


def cpu_native_bf16() -> str:
    """The CPU's native bf16 matrix instructions: "AMX" (AMX-BF16 tiles), "AVX512-BF16", or ""
    (none: bf16 matrix multiplies are emulated through float32 and slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return ""


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def environment_without_launch() -> dict[str, str]:
    """This process's environment minus the launcher's variables: for a helper subprocess that
    must start as a fresh single process (not as another rank of this job)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}


@dataclass(frozen=True)
class NetworkEnv:
    """What picks the network interface of the collectives, where the job's store is, and which
    node this is (empty, 0 or -1 when unset)."""

    gloo_ifname: str  # GLOO_SOCKET_IFNAME: the interface(s) gloo binds to; empty = from the hostname
    nccl_ifname: str  # NCCL_SOCKET_IFNAME: the same for NCCL; empty = NCCL's own choice
    master_addr: str  # MASTER_ADDR / MASTER_PORT: the store of this job's process group
    master_port: int
    node_rank: int  # GROUP_RANK: torchrun's rank of this node (agent)


def read_network_env() -> NetworkEnv:
    return NetworkEnv(
        gloo_ifname=os.environ.get("GLOO_SOCKET_IFNAME", ""),
        nccl_ifname=os.environ.get("NCCL_SOCKET_IFNAME", ""),
        master_addr=os.environ.get("MASTER_ADDR", ""),
        master_port=int(os.environ.get("MASTER_PORT", 0) or 0),
        node_rank=int(os.environ.get("GROUP_RANK", -1)),
    )


# Set by meshlm's own launcher (distributed/launch.py) for the workers it starts: the launcher
# reports an interrupt once, so its workers do not.
LAUNCHER_VARIABLE = "MESHLM_LAUNCHER"


def is_meshlm_worker() -> bool:
    """A worker process started by meshlm's launcher (not the launcher itself, not torchrun's)."""
    return os.environ.get(LAUNCHER_VARIABLE) == "1" and "RANK" in os.environ
