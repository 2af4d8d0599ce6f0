"""ParallelDims: the degrees of every parallel dimension, validated; ParallelMesh: the named
DeviceMesh built from them.

    world = pp x dp x tp,  dp = dp_replicate x dp_shard

Ranks are laid out with tp innermost (neighbouring ranks, the fastest links: one
node's NVLink) and pp outermost, as Megatron-LM and torchtitan do:

    rank = ((pp_rank x dp) + dp_rank) x tp + tp_rank

The value is built once from the config and the world size and handed to whatever
needs it; nothing here is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlm.config import (
    LOOPED_SCHEDULES,
    MULTI_STAGE_SCHEDULES,
    Config,
    ConfigError,
    schedule_stages_per_rank,
)
from meshlm.model.registry import family_spec
from meshlm.model.tp_rules import check_layout_supported

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of a layout: pure values, comparable, usable before any process exists."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    zero: int = 0
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def describe(self) -> str:
        dp = (
            f"dp={self.dp}"
            if self.dp_replicate == 1
            else f"dp={self.dp} (replicate {self.dp_replicate} x shard {self.dp_shard})"
        )
        return f"{dp} (zero {self.zero}), tp={self.tp}{' +sp' if self.sequence_parallel else ''}, pp={self.pp}"

    def coordinates(self, rank: int) -> dict[str, int]:
        """Position of `rank` along each axis, by name (pure arithmetic: the one place that
        knows the rank order; usable before any process group exists)."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return {
            "pp": pp_rank,
            "dp": dp_rank,
            "tp": tp_rank,
            "dp_replicate": dp_rank // self.dp_shard,
            "dp_shard": dp_rank % self.dp_shard,
        }

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        """The global rank at these coordinates (the inverse of `coordinates`)."""
        return (pp * self.dp + dp) * self.tp + tp

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The named DeviceMesh ("pp", "dp", "tp"); with HSDP ("pp", "dp_replicate", "dp_shard",
        "tp") whose flattened ("dp_replicate", "dp_shard") is "dp". Collective: every rank calls it."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.dp_replicate > 1:
            mesh = init_device_mesh(
                device_type,
                (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
            )
            return ParallelMesh(self, mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp"))
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        return ParallelMesh(self, mesh)


@dataclass(frozen=True)
class ParallelMesh:
    """The process groups of one ParallelDims on this process (built by `ParallelDims.build_mesh`).
    Axes are always addressed by name."""

    dims: ParallelDims
    device_mesh: DeviceMesh
    # With HSDP, the flattened ("dp_replicate", "dp_shard") mesh: PyTorch wants it kept by the
    # caller rather than sliced from the root mesh again.
    flat_dp: DeviceMesh | None = None

    def submesh(self, axis: str) -> DeviceMesh:
        """The 1-D mesh of one axis: "pp", "dp" or "tp" (and with HSDP "dp_replicate", "dp_shard")."""
        if axis == "dp" and self.flat_dp is not None:
            return self.flat_dp
        return self.device_mesh[axis]

    def group(self, axis: str):
        return self.submesh(axis).get_group()

    def local_rank(self, axis: str) -> int:
        """This process's coordinate along `axis`."""
        return self.submesh(axis).get_local_rank()

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 2-D (replicate, shard) with HSDP, else the dp axis."""
        if self.dims.dp_replicate > 1:
            return self.device_mesh["dp_replicate", "dp_shard"]
        return self.submesh("dp")

    def axis_names(self) -> list[str]:
        return list(self.device_mesh.mesh_dim_names) + (["dp"] if self.flat_dp is not None else [])


def parallel_dims_from_config(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve `parallel.dp = "auto"` and check every degree against the world size and the model.
    Raises ConfigError (naming every degree involved) before any process group is created."""
    p, m = cfg.parallel, cfg.model
    layout = f"tp={p.tp}, pp={p.pp}, dp={p.dp}"
    if world_size % (p.tp * p.pp):
        raise ConfigError(
            f"the world size {world_size} is not divisible by tp x pp = {p.tp} x {p.pp} = {p.tp * p.pp} ({layout}). "
            f"Choose tp and pp whose product divides the number of processes."
        )
    dp = world_size // (p.tp * p.pp) if p.dp == "auto" else p.dp
    if dp * p.tp * p.pp != world_size:
        raise ConfigError(
            f"dp x tp x pp = {dp} x {p.tp} x {p.pp} = {dp * p.tp * p.pp} but the world size is {world_size}. "
            f'Set parallel.dp="auto" or degrees whose product is {world_size}.'
        )
    if dp % p.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) must divide the data-parallel degree dp ({dp}) for HSDP "
            f"(dp = dp_replicate x dp_shard; {layout})."
        )
    if p.dp_replicate > 1 and p.zero != 3:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) > 1 is HSDP, which shards parameters: it needs parallel.zero=3 "
            f"(got zero={p.zero})."
        )
    check_layout_supported(m, tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel)
    if cfg.train.optimizer == "em" and family_spec(m).em is None:
        raise ConfigError(
            f"train.optimizer=\"em\" needs a model family with an EM procedure; model.family '{m.family}' has none. "
            f'Use train.optimizer="adamw", "sgd" or "lbfgs", or a family that has one (see docs/families).'
        )
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs tp > 1 (it splits the sequence over the tp ranks).")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(
            f"sequence parallel splits the sequence over tp ranks: data.seq_len ({cfg.data.seq_len}) must be divisible by tp ({p.tp})."
        )
    t = cfg.train
    if t.global_batch and t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"'train.global_batch' ({t.global_batch}) must be a multiple of 'train.micro_batch' ({t.micro_batch}) "
            f"x the data-parallel degree dp ({dp}) = {t.micro_batch * dp} (global_batch = micro_batch x accumulation x dp; "
            f"{layout}). Change global_batch or micro_batch."
        )
    _validate_pipeline(cfg, dp)
    return ParallelDims(world_size, p.dp_replicate, dp // p.dp_replicate, p.tp, p.pp, p.zero, p.sequence_parallel)


def stages_per_rank(cfg: Config) -> int:
    return schedule_stages_per_rank(cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages)


def pipeline_microbatches(cfg: Config, dp: int) -> int:
    """Micro-batches per pipeline step: parallel.pp_microbatches, or by default the data-parallel
    rank's batch split into train.micro_batch-sized pieces (the schedule is the accumulation)."""
    t = cfg.train
    local_batch = t.global_batch_for(dp) // dp
    return cfg.parallel.pp_microbatches or max(1, local_batch // t.micro_batch)


def _validate_pipeline(cfg: Config, dp: int) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if p.pp == 1:
        return
    v = stages_per_rank(cfg)
    n_blocks = family_spec(cfg).n_blocks(m)
    if p.pp_schedule in ("gpipe", "1f1b") and p.pp_virtual_stages != 1:
        raise ConfigError(
            f'parallel.pp_schedule="{p.pp_schedule}" runs one stage per rank; parallel.pp_virtual_stages '
            f'({p.pp_virtual_stages}) needs "interleaved-1f1b" or "interleaved-zero-bubble".'
        )
    if p.pp_schedule in LOOPED_SCHEDULES and v < 2:
        raise ConfigError(f'parallel.pp_schedule="{p.pp_schedule}" needs parallel.pp_virtual_stages >= 2 (got {v}).')
    if p.pp_schedule == "zbv" and p.pp_virtual_stages not in (1, 2):
        raise ConfigError(
            f"the zbv schedule uses exactly 2 stages per rank (a V shape); set parallel.pp_virtual_stages=2, not {p.pp_virtual_stages}."
        )
    n_stages = p.pp * v
    if isinstance(p.pp_split, list):
        if len(p.pp_split) != n_stages or sum(p.pp_split) != n_blocks:
            raise ConfigError(
                f"parallel.pp_split {p.pp_split} must list {n_stages} layer counts (pp {p.pp} x {v} stages per rank) "
                f"summing to model.n_layers ({n_blocks})."
            )
    elif n_blocks < n_stages:
        raise ConfigError(
            f"model.n_layers ({n_blocks}) is less than the number of pipeline stages (pp {p.pp} x {v} per rank = {n_stages}); "
            f"lower pp or pp_virtual_stages."
        )
    local_batch = t.global_batch_for(dp) // dp
    micro = pipeline_microbatches(cfg, dp)
    if local_batch % micro:
        raise ConfigError(
            f"each data-parallel rank's batch ({local_batch} sequences = train.global_batch / dp {dp}) must be divisible by "
            f"parallel.pp_microbatches ({micro})."
        )
    if p.pp_schedule in MULTI_STAGE_SCHEDULES and micro % p.pp:
        raise ConfigError(
            f"the {p.pp_schedule} schedule needs parallel.pp_microbatches ({micro}) to be a multiple of pp ({p.pp})."
        )
    if micro < p.pp:
        raise ConfigError(
            f"parallel.pp_microbatches ({micro}) is fewer than the pipeline stages pp ({p.pp}): the {p.pp_schedule} schedule "
            f"needs at least one micro-batch per stage. Raise pp_microbatches to >= {p.pp}."
        )
