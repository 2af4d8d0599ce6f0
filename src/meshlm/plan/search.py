"""The layout search: every layout that divides the model and the cluster, ranked.

Enumerated: tp (a divisor of the heads, the key/value heads and the MLP, at most one node),
pp (at most the layers), dp = devices / (tp pp) dividing the global batch, the micro-batch
(a divisor of each data-parallel rank's batch; with a pipeline at least pp micro-batches),
the ZeRO stage up to the software's highest (and HSDP with one replica per node when the shard
group fills a node),
sequence parallelism, activation recomputation, and with a pipeline the schedule and its
virtual stages. Each is estimated (cost.estimate); those that do not fit in memory are kept
with the reason, after the ones that fit. Ranked by predicted step time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from meshlm.config import PIPELINE_SCHEDULES, ConfigError
from meshlm.model.registry import family_spec
from meshlm.model.tp_rules import tp_problem
from meshlm.plan import family_cost
from meshlm.plan.cost import Estimate, estimate
from meshlm.plan.family_shapes import has_block_model
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Software, Workload, check_meshlm_layout

MAX_MICRO_BATCH = 64
VIRTUAL_STAGES = (2, 3, 4, 6, 8)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchResult:
    candidates: list[Estimate]  # fitting ones first (fastest first), then the rest (smallest memory first)
    evaluated: int
    rejected: dict[str, int] = field(default_factory=dict)  # why layouts were not enumerated (counts)
    estimates: list[Estimate] = field(default_factory=list)  # every layout evaluated (unchecked, unordered)

    @property
    def best(self) -> Estimate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None


def candidate_layouts(
    workload: Workload,
    cluster: Cluster,
    sw: Software,
    *,
    recompute: tuple[str, ...] | None = None,
    zero: tuple[int, ...] = (0, 1, 2, 3),
    schedules: tuple[str, ...] | None = None,
    micro_batches: tuple[int, ...] | None = None,
    rejected: dict | None = None,
) -> Iterator[Layout]:
    m = workload.model
    world = cluster.world_size
    rejected = rejected if rejected is not None else {}
    if recompute is None:
        recompute = ("none", "full") if sw.name == "meshlm" else ("none", "selective", "full")
        if sw.attention == "flash" and "selective" in recompute:
            recompute = tuple(r for r in recompute if r != "selective")  # flash already recomputes the scores
    if schedules is None:
        schedules = [s for s in PIPELINE_SCHEDULES if s != "gpipe"]  # gpipe: 1f1b's time, more memory

    def reject(why: str) -> None:
        rejected[why] = rejected.get(why, 0) + 1

    for tp in divisors(world):
        if tp > cluster.devices_per_node:
            reject("tp larger than a node")
            continue
        if tp_problem(m, tp):
            reject("tp does not divide the heads / MLP")
            continue
        for pp in divisors(world // tp):
            if pp > m.n_layers:
                reject("pp larger than the layers")
                continue
            dp = world // (tp * pp)
            if workload.global_batch % dp:
                reject("dp does not divide the global batch")
                continue
            local = workload.global_batch // dp
            for mb in divisors(local):
                if mb > MAX_MICRO_BATCH or (micro_batches and mb not in micro_batches):
                    continue
                n_micro = local // mb
                if pp > 1 and n_micro < pp:
                    reject("fewer micro-batches than pipeline stages")
                    continue
                for z in [z for z in zero if z <= sw.max_zero] if dp > 1 else (0,):
                    replicas = [1]
                    per_node = max(1, cluster.devices_per_node // tp)
                    if z == 3 and cluster.nodes > 1 and dp > per_node and dp % per_node == 0:
                        replicas.append(dp // per_node)  # HSDP: shard inside a node, replicate across nodes
                    for rep in replicas:
                        for rc in recompute:
                            for sp in (False, True) if tp > 1 and workload.seq_len % tp == 0 else (False,):
                                base = Layout(dp, tp, pp, z, mb, rc, sp, "1f1b", 1, rep)
                                if pp == 1:
                                    yield base
                                    continue
                                for sched in schedules:
                                    if sched in ("gpipe", "1f1b"):
                                        yield Layout(dp, tp, pp, z, mb, rc, sp, sched, 1, rep)
                                    elif n_micro % pp:
                                        reject(f"{sched} needs micro-batches divisible by pp")
                                    elif sched == "zbv":
                                        if m.n_layers >= 2 * pp:
                                            yield Layout(dp, tp, pp, z, mb, rc, sp, sched, 2, rep)
                                    else:
                                        for v in VIRTUAL_STAGES:
                                            if pp * v <= m.n_layers:
                                                yield Layout(dp, tp, pp, z, mb, rc, sp, sched, v, rep)


def evaluate(workload: Workload, layout: Layout, cluster: Cluster, sw: Software) -> Estimate:
    """One layout's estimate: the detailed block model where it describes the model, else the
    family-spec model (family_cost.py)."""
    if has_block_model(workload.model):
        return estimate(workload, layout, cluster, sw)
    return family_cost.estimate_family(workload, layout, cluster, sw)


def search(
    workload: Workload, cluster: Cluster, sw: Software, *, top: int | None = None, meshlm_only: bool = True, **options
) -> SearchResult:
    """Estimate every candidate layout and rank them. With `meshlm_only`, the top candidates are
    also checked against meshlm's own layout validation (parallel_dims_from_config)."""
    rejected: dict[str, int] = {}
    if has_block_model(workload.model):
        layouts = candidate_layouts(workload, cluster, sw, rejected=rejected, **options)
    else:
        layouts = family_cost.candidate_layouts(workload, cluster, sw, rejected)
    estimates = [evaluate(workload, layout, cluster, sw) for layout in layouts]
    if not estimates:
        spec = family_spec(workload.model)
        raise ConfigError(
            f"no layout divides this model and cluster: {cluster.world_size} devices, global batch "
            f"{workload.global_batch}, {spec.describe(workload.model)} "
            f"({', '.join(f'{k}: {v}' for k, v in rejected.items()) or 'nothing enumerated'}). "
            f"Change the global batch (a multiple of the data-parallel degree) or the device count."
        )
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: e.step_time_s)
    others = sorted((e for e in estimates if not e.fits), key=lambda e: e.memory.total)
    ranked = fitting + others
    if meshlm_only and sw.name == "meshlm":
        checked = []
        for e in ranked:
            if top is not None and len(checked) >= top:
                break
            try:
                check_meshlm_layout(e.layout, workload, cluster.world_size)
            except ConfigError as err:
                e.meshlm_valid, e.invalid_reason = False, str(err)
                continue
            checked.append(e)
        ranked = checked
    elif top is not None:
        ranked = ranked[:top]
    return SearchResult(ranked, len(estimates), rejected, estimates)
