"""`parallel = "auto"`: the planner chooses the layout for the world size at hand.

    from meshlm.plan.auto import choose_layout
    keys = choose_layout(cfg, world_size)    # {"dp": .., "tp": .., ..., "micro_batch": .., "activation_checkpointing": ..}

The workload is the config's model, train.global_batch (0: train.micro_batch x world size)
and data.seq_len. With `parallel.auto_measure = K` the K best-predicted layouts are then
trained for a few steps each on this machine (plan/measure.py) and the fastest measured wins. On CPU the cluster is `cpu-local` (measured once per machine, then read
from the cache); on CUDA the GPU's preset (by device name) with the local processes as one
node per LOCAL_WORLD_SIZE. The layout returned is one meshlm runs (parallel_dims_from_config
accepts it); the choice and the runner-up are logged.

Every rank must agree on the layout: when torch.distributed is initialised, rank 0 plans and
broadcasts the answer; otherwise call this once, before the workers start.
"""

from __future__ import annotations

from meshlm.config import Config, ConfigError
from meshlm.distributed.env import accelerator, read_launch_env
from meshlm.plan.clusters import make_cluster
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Layout, Workload, check_meshlm_layout, software_for
from meshlm.plan.measure import DEFAULT_STEPS, check_measurable, format_measured, measure_candidates, summary


def _gpu_preset(name: str, memory_bytes: float) -> str:
    name = name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-sxm"
    if "A100" in name:
        return "a100-80gb" if memory_bytes > 50e9 else "a100-40gb"
    return "h100-sxm"


def cluster_for(world_size: int, log=print) -> Cluster:
    """The cluster this process runs on: cpu-local, or the CUDA devices' preset."""
    gpus = accelerator()
    if gpus is not None:
        per_node = read_launch_env().local_world_size or min(world_size, gpus.count)
        per_node = max(1, min(per_node, world_size))
        return make_cluster(
            _gpu_preset(gpus.name, gpus.memory_bytes), nodes=max(1, world_size // per_node), devices_per_node=per_node
        )
    return make_cluster("cpu-local", devices_per_node=world_size, log=log)


def _plan(cfg: Config, world_size: int, log) -> dict[str, object]:
    from meshlm.plan.report import runner_up
    from meshlm.plan.search import search

    cluster = cluster_for(world_size, log)
    t = cfg.train
    workload = Workload(cfg.model, t.global_batch_for(world_size), cfg.data.seq_len)
    sw = software_for("meshlm", cluster.device.kind, t.dtype)
    result = search(workload, cluster, sw, top=max(20, cfg.parallel.auto_measure), meshlm_only=True)
    best = result.best
    if best is None:
        detail = result.candidates[0].reason if result.candidates else "no layout divides the model and the world size"
        raise ConfigError(
            f'parallel = "auto": no layout of this model fits {world_size} process(es) on '
            f"{cluster.describe()}: {detail}. Lower train.micro_batch or the model size, or set the layout by hand."
        )
    if cfg.parallel.auto_measure > 1:
        # time the best-predicted layouts on this machine and take the one measured fastest
        check_measurable(cluster)
        measured = measure_candidates(cfg, workload, result.candidates, cfg.parallel.auto_measure, DEFAULT_STEPS, log)
        log(format_measured(measured, DEFAULT_STEPS))
        fastest = summary(measured)["best"]
        if fastest is not None:
            best = fastest.estimate
    check_meshlm_layout(best.layout, workload, world_size, cfg)
    second = runner_up(result.candidates)
    log(
        f"parallel = auto: {best.layout.describe()} on {cluster.describe()}: predicted {best.step_time_s:.3g} s per step, "
        f"{best.memory_gb_per_device:.3g} GiB per {'process (model state)' if cluster.device.kind == 'cpu' else 'device'}"
        + (f"; runner-up {second.layout.describe()}: {second.step_time_s:.3g} s" if second else "; no runner-up")
    )
    return best.layout.parallel_section()


def choose_layout(cfg: Config, world_size: int, log=print) -> dict[str, object]:
    """The [parallel] keys (dp, zero, dp_replicate, tp, sequence_parallel, pp, pp_schedule,
    pp_microbatches, pp_virtual_stages) plus micro_batch and activation_checkpointing for the
    fastest layout that fits, as the planner predicts it."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from meshlm.distributed.rank_zero import run_on_rank0

        return run_on_rank0(lambda: _plan(cfg, world_size, log), distributed=True)
    return _plan(cfg, world_size, log)


def apply_layout(cfg: Config, keys: dict[str, object]) -> None:
    """Write choose_layout's answer into the config (parallel section, micro-batch, checkpointing)."""
    keys = dict(keys)
    cfg.train.micro_batch = int(keys.pop("micro_batch"))
    cfg.train.activation_checkpointing = bool(keys.pop("activation_checkpointing"))
    for key, value in keys.items():
        setattr(cfg.parallel, key, value)


__all__ = ["choose_layout", "apply_layout", "cluster_for", "Layout"]


def resolve_auto_layout(cfg: Config, world_size: int, log=print) -> None:
    """`parallel = "auto"`: write the planner's layout for this world size into cfg (called by the
    launch layer, before the trainer exists; under a process group rank 0 plans for all)."""
    apply_layout(cfg, choose_layout(cfg, world_size, log=log))
    cfg.parallel.auto = False
