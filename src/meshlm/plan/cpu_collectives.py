"""cpu-local's collective costs: gloo between forked local processes, measured in place.

Two parts. Each collective's own latency and bandwidth between 2 processes, back to back, at
4 KB, 256 KB and 4 MB (gloo's cost is not linear over that range: two segments). And, for 2, 4
and 8 processes (and the core count and twice it), in groups of 2 and of all of them, all groups
at once, the cost of a 4 KB all-reduce issued between equal slices of matrix work, as collectives
are issued in a training step: the ranks' uneven arrival, and with more processes than cores the
wait for a core, are part of it. A collective among p of N processes then costs
    (its own latency) x (p - 1) + (the in-situ arrival cost for N, p) + bytes x (its own cost per byte, ring-scaled)
All-gathers and reduce-scatters are also measured in situ themselves, at 256 KB (the size of FSDP
units' and sequence-parallel activations' collectives in small models): gloo's cost for them between
busy ranks exceeds their back-to-back latency by more than the all-reduce's arrival cost, and that
excess, when larger, replaces the arrival cost for them.
"""

from __future__ import annotations

import time

OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
SMALL, MEDIUM, LARGE = 4096, 1 << 18, 1 << 22  # gloo's cost is not linear over this range: two segments


def _collective_rank(rank: int, group_sizes: tuple[int, ...], reps: int, isolated: bool) -> dict:
    """On each rank. `isolated` (2 processes): every collective at 4 KB, 256 KB and 4 MB back to
    back: the latency and bandwidth of each. Then, for every group size p, the world split into groups
    of p ranks that all communicate at once, a 4 KB all-reduce issued between equal slices of
    matrix work as in a training step: the ranks' uneven arrival (and, with more processes than
    cores, the wait for a core) is part of that cost. Costs are the loop's time minus the work's."""
    import torch
    import torch.distributed as dist

    from meshlm.distributed.collectives import all_gather_single, reduce_scatter_single

    world = dist.get_world_size()
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def work():
        a @ b
        a @ b

    def timed(fn, n_reps: int = reps) -> float:
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(n_reps):
                fn()
            best = min(best, (time.perf_counter() - t) / n_reps)
        return best

    out: dict = {}
    if isolated:
        peer = 1 - rank
        for n in (SMALL, MEDIUM, LARGE):
            full, shard = torch.zeros(n // 4), torch.zeros(n // 4 // world)

            def send_recv():
                if rank == 0:
                    dist.send(full, peer)
                    dist.recv(full, peer)
                else:
                    dist.recv(full, peer)
                    dist.send(full, peer)

            ops = {
                "all_reduce": lambda: dist.all_reduce(full),
                "all_gather": lambda: all_gather_single(full, shard),
                "reduce_scatter": lambda: reduce_scatter_single(shard, full),
                "send_recv": send_recv,
            }
            for op, fn in ops.items():
                out[f"{op}|{n}"] = timed(fn, 2 * reps if n < LARGE else reps) / (2 if op == "send_recv" else 1)
    groups = {}
    for p in group_sizes:
        groups[p] = None
        if p < world:
            for start in range(0, world, p):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(start, start + p)))
                if start <= rank < start + p:
                    groups[p] = g
    base = timed(work)
    small = torch.zeros(SMALL // 4)
    for p in group_sizes:
        g = groups[p]
        out[f"in_situ|{p}"] = max(1e-6, timed(lambda: (work(), dist.all_reduce(small, group=g))) - base)
        # all-gathers and reduce-scatters of the size FSDP units and sequence-parallel activations
        # have, issued the same way: gloo's cost for them between busy ranks is not the all-reduce's
        n = MEDIUM // 4 // p * p
        full, shard = torch.zeros(n), torch.zeros(n // p)
        out[f"in_situ_all_gather|{p}"] = max(
            1e-6, timed(lambda: (work(), all_gather_single(full, shard, group=g))) - base
        )
        out[f"in_situ_reduce_scatter|{p}"] = max(
            1e-6, timed(lambda: (work(), reduce_scatter_single(shard, full, group=g))) - base
        )
    return out


def world_sizes(n_cores: int) -> tuple[int, ...]:
    """The process counts measured: 2, 4, 8 and the core count and twice it (at most 32)."""
    return tuple(sorted({n for n in (2, 4, 8, n_cores, 2 * n_cores) if 2 <= n <= 32}))


def measure_collectives(n_cores: int) -> dict:
    """{world: {group size: {op: [[alpha_s, s_per_byte] up to 256 KB, [alpha_s, s_per_byte] above]}}}:
    each collective's own latency and bandwidth between 2 processes (ring-scaled to p), plus the
    arrival cost measured in situ for this many processes and this group size."""
    from meshlm.distributed.spawn import run_distributed

    table: dict = {}
    own: dict = {}
    for world in world_sizes(n_cores):
        sizes = tuple(sorted({2, world}))
        raw = run_distributed(_collective_rank, world, sizes, 5 if world > 2 * n_cores else 8, world == 2, timeout=300)
        merged = {k: max(r.get(k, 0.0) for r in raw) for k in raw[0]}  # the slowest rank sets the pace
        if world == 2:
            for op in OPS:
                segments = []
                for lo, hi in ((SMALL, MEDIUM), (MEDIUM, LARGE)):
                    t_lo, t_hi = merged[f"{op}|{lo}"], merged[f"{op}|{hi}"]
                    beta = max(1e-12, (t_hi - t_lo) / (hi - lo))
                    segments.append((max(1e-6, t_lo - beta * lo), beta))
                own[op] = segments
            isolated_small = merged[f"all_reduce|{SMALL}"]
        table[str(world)] = {}
        for p in sizes:
            arrival = max(0.0, merged[f"in_situ|{p}"] - isolated_small * (p - 1))
            entry = {}
            for op, segments in own.items():
                ring = 1 if op == "send_recv" else p - 1
                scale = 1 if op == "send_recv" else ((p - 1) / p) / 0.5
                entry[op] = [[alpha * ring, beta * scale] for alpha, beta in segments]
                extra = arrival
                if f"in_situ_{op}|{p}" in merged:  # measured in situ itself: what it costs beyond its own latency
                    n = MEDIUM // 4 // p * p * 4
                    alpha, beta = entry[op][0] if n <= MEDIUM else entry[op][-1]
                    extra = max(arrival, merged[f"in_situ_{op}|{p}"] - (alpha + beta * n))
                entry[op] = [[alpha + extra, beta] for alpha, beta in entry[op]]
            table[str(world)][str(p)] = entry
    return table
