"""Clusters by name: the presets and cluster files of hardware.py, and the measured `cpu-local`
preset of cpu_local.py (kept apart so that neither of those two modules imports the other)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.plan.cpu_local import cpu_local_cluster
from meshlm.plan.hardware import CLUSTERS, CPU_LOCAL, DEVICES, Cluster, load_cluster_file


def preset_names() -> list[str]:
    return sorted(set(CLUSTERS) | {CPU_LOCAL})


def make_cluster(
    name_or_file: str,
    nodes: int | None = None,
    devices_per_node: int | None = None,
    world_size: int | None = None,
    remeasure: bool = False,
    log=None,
) -> Cluster:
    """A cluster from a preset name (`dgx-h100`, `a100-80gb`, `cpu-local`, ...) or a TOML file,
    with the node count and devices per node overridden when given. For cpu-local the
    "devices" are local processes: `world_size` (or devices_per_node) of them on one node."""
    if nodes is not None and nodes <= 0 or devices_per_node is not None and devices_per_node <= 0:
        raise ConfigError(f"--nodes ({nodes}) and --devices-per-node ({devices_per_node}) must be positive.")
    if name_or_file == CPU_LOCAL:
        n = devices_per_node or world_size or 1
        if nodes not in (None, 1):
            raise ConfigError(f"cpu-local is this one machine: --nodes must be 1, got {nodes}.")
        return cpu_local_cluster(n, remeasure=remeasure, log=log)
    path = Path(name_or_file)
    if name_or_file.endswith(".toml") or path.is_file():
        cluster = load_cluster_file(path, nodes, devices_per_node)
    elif name_or_file in CLUSTERS:
        device, intra, inter, per_node = CLUSTERS[name_or_file]
        cluster = Cluster(name_or_file, DEVICES[device], 1, per_node, intra, inter)
    else:
        raise ConfigError(
            f"unknown cluster '{name_or_file}': not a preset and not a TOML file. Presets: {', '.join(preset_names())}; "
            f"or write your own cluster file (docs/planner.md, 'Cluster files')."
        )
    if devices_per_node is None and nodes is None and world_size is not None:
        per_node = cluster.devices_per_node
        if world_size % per_node and world_size > per_node:
            raise ConfigError(
                f"{world_size} devices do not fill whole nodes of {per_node} on '{cluster.name}'; "
                f"pass --nodes and --devices-per-node."
            )
        nodes, devices_per_node = max(1, world_size // per_node), min(per_node, world_size)
    return replace(cluster, nodes=nodes or cluster.nodes, devices_per_node=devices_per_node or cluster.devices_per_node)
