"""Collective costs: the alpha-beta (latency-bandwidth) model on the link a group crosses.

Ring algorithms (what NCCL and gloo use for large messages), n = bytes of the full tensor,
p = group size, alpha = per-step latency, r = achieved link rate:

    all-reduce        2 (p - 1) alpha + 2 (p - 1) / p * n / r
    all-gather        (p - 1) alpha + (p - 1) / p * n / r        (n = gathered output)
    reduce-scatter    (p - 1) alpha + (p - 1) / p * n / r        (n = input)
    send / recv       alpha + n / r

Which link: meshlm places ranks tp innermost, then dp, then pp
(rank = ((pp_rank * dp) + dp_rank) * tp + tp_rank), so a group is `size` ranks `stride`
apart: tp (stride 1), dp (stride tp), pp (stride tp * dp). A group inside one node uses the
intra-node link. A group spanning nodes with g members per node is limited by the slower of
the intra-node link and g network ports (each device has its own port; a ring's traffic
through a node's boundary is spread over the node's g members: NCCL uses one ring per port).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlm.plan.hardware import Cluster, Link


@dataclass(frozen=True)
class Group:
    """A process group as placed on the cluster."""

    size: int
    per_node: int  # members inside one node
    nodes: int  # nodes spanned

    @property
    def crosses_nodes(self) -> bool:
        return self.nodes > 1


def place_group(cluster: Cluster, size: int, stride: int) -> Group:
    """The placement of a group of `size` ranks, `stride` apart in meshlm's rank order."""
    if size <= 1:
        return Group(1, 1, 1)
    d = cluster.devices_per_node
    per_node = max(1, min(size, d // stride)) if stride <= d else 1
    nodes = -(-size // per_node)
    return Group(size, per_node, nodes)


def _rate_and_alpha(cluster: Cluster, group: Group) -> tuple[float, float]:
    if not group.crosses_nodes:
        return cluster.intra.rate, cluster.intra.latency_s
    inter: Link = cluster.inter
    return min(cluster.intra.rate, group.per_node * inter.rate), inter.latency_s


# A collective's kernels read and write device memory about 3 bytes per byte on the wire (a ring step
# receives into memory, reads it back to reduce or forward it, and writes the result), through SMs
# the compute beside it would otherwise use. Overlapped with compute, it is not free: the compute is
# charged the time the device's memory needs for that traffic.
HBM_BYTES_PER_WIRE_BYTE = 3.0


def overlap_cost(cluster: Cluster, group: Group) -> float:
    """Seconds of compute lost per second of collective overlapped with it (GPUs; 0 on CPUs, where
    meshlm overlaps nothing beyond what the measured in-situ costs already contain)."""
    if cluster.device.kind != "gpu" or group.size <= 1:
        return 0.0
    rate, _ = _rate_and_alpha(cluster, group)
    return rate * HBM_BYTES_PER_WIRE_BYTE / cluster.device.elementwise_bandwidth


MEASURED_SPLIT = 1 << 18  # cpu-local's two measured segments: up to 256 KB, and above


def measured(cluster: Cluster, op: str, p: int, nbytes: float) -> float:
    """cpu-local: the measured cost of one collective among p of the cluster's processes: the
    measurement for the nearest process count at or above the world size and this group size
    (other group sizes scaled as a ring would: latency by p - 1, bytes by (p - 1) / p)."""
    table = cluster.measured_collectives
    worlds = sorted(int(w) for w in table)
    active = cluster.active_processes or cluster.world_size
    upper = next((w for w in worlds if w >= active), worlds[-1])
    lower = max([w for w in worlds if w <= active and w <= upper] or [upper])

    def cost(world: int) -> float:
        entry = table[str(world)]
        sizes = sorted(int(q) for q in entry)
        if op == "send_recv":
            key = sizes[0]  # pairs of processes
        else:
            key = p if p in sizes else max([q for q in sizes if q <= p] or sizes[:1])
        segments = entry[str(key)][op]
        alpha, beta = segments[0] if nbytes <= MEASURED_SPLIT else segments[-1]
        if key != p and op != "send_recv":
            alpha *= (p - 1) / (key - 1)
            beta *= ((p - 1) / p) / ((key - 1) / key)
        if active > world:  # beyond the measurement: more processes wait for a core
            alpha *= active / world
        return alpha + beta * nbytes

    if lower == upper:
        return cost(upper)
    share = (active - lower) / (upper - lower)  # between two measured process counts: linear
    return (1 - share) * cost(lower) + share * cost(upper)


def all_reduce(cluster: Cluster, group: Group, nbytes: float, count: int = 1) -> float:
    """`count` all-reduces of `nbytes` each."""
    p = group.size
    if p <= 1 or nbytes <= 0 or count <= 0:
        return 0.0
    if cluster.measured_collectives:
        return count * measured(cluster, "all_reduce", p, nbytes)
    rate, alpha = _rate_and_alpha(cluster, group)
    return count * (2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / rate)


def all_gather(cluster: Cluster, group: Group, nbytes: float, count: int = 1, op: str = "all_gather") -> float:
    """`count` all-gathers whose output has `nbytes` (each rank contributes nbytes / p)."""
    p = group.size
    if p <= 1 or nbytes <= 0 or count <= 0:
        return 0.0
    if cluster.measured_collectives:
        return count * measured(cluster, op, p, nbytes)
    rate, alpha = _rate_and_alpha(cluster, group)
    return count * ((p - 1) * alpha + (p - 1) / p * nbytes / rate)


def reduce_scatter(cluster: Cluster, group: Group, nbytes: float, count: int = 1) -> float:
    """`count` reduce-scatters of an `nbytes` input (each rank keeps nbytes / p): the all-gather's
    traffic on the ring formulas; measured separately on cpu-local (gloo's differ)."""
    return all_gather(cluster, group, nbytes, count, op="reduce_scatter")


def send_recv(cluster: Cluster, crosses_nodes: bool, nbytes: float, count: int = 1) -> float:
    if nbytes <= 0 or count <= 0:
        return 0.0
    if cluster.measured_collectives:
        return count * measured(cluster, "send_recv", 2, nbytes)
    link = cluster.inter if crosses_nodes else cluster.intra
    return count * (link.latency_s + nbytes / link.rate)


def bucketed_all_reduce(cluster: Cluster, group: Group, nbytes: float, bucket_bytes: float) -> float:
    """DDP-style: the gradients in buckets of `bucket_bytes` (each bucket pays the latency)."""
    if nbytes <= 0:
        return 0.0
    full, rest = divmod(nbytes, bucket_bytes)
    return all_reduce(cluster, group, bucket_bytes, int(full)) + all_reduce(cluster, group, rest, 1 if rest else 0)


def bucketed_half(cluster: Cluster, group: Group, nbytes: float, bucket_bytes: float, op: str = "all_gather") -> float:
    """Reduce-scatter or all-gather of `nbytes` in buckets (ZeRO-1/2)."""
    if nbytes <= 0:
        return 0.0
    full, rest = divmod(nbytes, bucket_bytes)
    return all_gather(cluster, group, bucket_bytes, int(full), op) + all_gather(
        cluster, group, rest, 1 if rest else 0, op
    )
