"""The one ordered function that turns a single-device model into what trains on this rank.

Order (DESIGN.md, torchtitan): pipeline split, then tensor parallel, activation
checkpointing, compile, and data parallel / sharding last, so each step wraps what
the previous one produced. The result, `ParallelModel`, holds the model parts this
rank runs (one, or several pipeline stages), the process groups they talk over, and
the few facts the trainer needs to stay layout-independent (loss, gradient norm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from meshlm.config import Config, ModelConfig
from meshlm.distributed.dims import ParallelDims, ParallelMesh, pipeline_microbatches, stages_per_rank
from meshlm.model.loss import lm_loss
from meshlm.model.registry import family_spec
from meshlm.model.spec import submodule
from meshlm.parallel.activation_checkpoint import apply_activation_checkpointing
from meshlm.parallel.data_parallel import apply_data_parallel, unwrap
from meshlm.parallel.tp_plan import ShardRules, shard_rules
from meshlm.parallel.wrappers import clean_name


@dataclass
class ParallelModel:
    dims: ParallelDims
    parts: list[nn.Module]  # what this rank calls: the model, or its pipeline stages (possibly wrapped)
    stage_ids: list[int] = field(default_factory=lambda: [0])
    n_stages: int = 1
    schedule: object | None = None
    tp_group: object | None = None
    dp_group: object | None = None
    pp_group: object | None = None
    tied_sync: object | None = None
    model_cfg: ModelConfig | None = None
    mesh: ParallelMesh | None = None  # None on a single process
    layer_counts: list[int] | None = None  # blocks per pipeline stage (pp > 1)
    stage_costs: object | None = None  # the measured StageCosts behind them (pp_split = "measured")
    # What the model is trained to do (meshlm.train.objective): its `loss(pm, output, target)`
    # replaces the language-modelling cross-entropy below, in the step and in the pipeline's
    # last stage. None: language modelling.
    objective: object | None = None

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    @functools.cached_property
    def shard_rules(self) -> ShardRules:
        """Which parameters tensor parallelism splits (the family's plan)."""
        return shard_rules(self.model_cfg)

    @property
    def is_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def is_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def modules(self) -> list[nn.Module]:
        """The model parts without DDP wrappers (FSDP2 and TP change modules in place)."""
        return [unwrap(p) for p in self.parts]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter this rank holds, each once, with single-device names."""
        seen, out = set(), []
        for module in self.modules():
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((clean_name(name), p))
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The objective's loss of this micro-batch when one is set; else the cross-entropy of this
        rank's logits: vocabulary-parallel under tp (the full logits are never gathered), plain
        otherwise."""
        if self.objective is not None:
            return self.objective.loss(self, logits, targets)
        return self.lm_loss(logits, targets, reduction)

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.dims.tp > 1:
            from meshlm.parallel.vocab_parallel import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.vocab_size, reduction=reduction)
        return lm_loss(logits, targets, reduction=reduction)

    def grad_copies(self, name: str) -> float:
        """How many ranks hold an identical copy of this parameter's local gradient. A world-wide
        sum of squares divided by it counts every gradient element exactly once."""
        copies = 1.0
        if self.dims.tp > 1:
            copies *= 1 if self.shard_rules.shard_dim(name) is not None else self.dims.tp
        if self.dims.zero == 0:
            copies *= self.dims.dp  # DDP: every dp rank holds the full averaged gradient
        elif self.dims.zero == 3:
            copies *= self.dims.dp_replicate  # FSDP: sharded within a group, replicated across groups
        # zero 1/2: the sharded optimizer counts only its own shard (see zero.py)
        if self.tied_sync is not None:
            copies *= self.tied_sync.tied_copies(name)
        return copies


def parallelize(
    model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device, mesh: ParallelMesh | None = None
) -> ParallelModel:
    """Split, shard and wrap `model` (the full single-device model, identical on every rank)
    for this rank's place in `mesh` (None: a single process)."""
    spec = family_spec(cfg)
    groups = {}
    if mesh is not None:
        groups = {axis: mesh.group(axis) for axis in ("pp", "dp", "tp")}
    pp_rank = mesh.local_rank("pp") if mesh is not None else 0

    # 1. Pipeline split: this rank's stages, each a pruned copy of the model.
    stage_ids, n_stages, parts, tied_sync = [0], 1, [model], None
    counts, measured = None, None
    if dims.pp > 1:
        from meshlm.parallel import pipeline, pipeline_split

        v = stages_per_rank(cfg)
        n_stages = dims.pp * v
        if cfg.parallel.pp_split == "measured":  # every rank times the blocks; they agree on one split
            from meshlm.parallel.block_timing import agreed_stage_costs, measure_stage_costs

            local = measure_stage_costs(model, cfg.train.micro_batch, cfg.data.seq_len, device)
            measured = agreed_stage_costs(local, device)
        counts = pipeline_split.stage_layer_counts(cfg, n_stages, measured)
        stage_ids = pipeline_split.stage_ids_for_rank(pp_rank, dims.pp, cfg.parallel.pp_schedule, v)
        parts = [pipeline_split.build_stage_module(model, s, n_stages, counts) for s in stage_ids]
        tied_sync = (
            pipeline.TiedEmbeddingSync(parts, stage_ids, n_stages, cfg.parallel.pp_schedule, dims)
            if spec.tied(cfg.model)
            else None
        )

    # 2. Tensor parallel (+ sequence parallel), on each stage.
    if dims.tp > 1:
        from meshlm.parallel.tensor_parallel import apply_tensor_parallel

        for part in parts:
            apply_tensor_parallel(part, groups["tp"], sequence_parallel=dims.sequence_parallel)

    # 3. Activation checkpointing, 4. compile.
    for part in parts:
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(submodule(part, spec.blocks))
        if cfg.train.compile:
            # Per block, as torchtitan does: small graphs compile fast and are reused across layers.
            blocks = submodule(part, spec.blocks)
            for name, block in list(blocks.named_children()):
                blocks[name] = torch.compile(block)

    # 5. Data parallel / sharding.
    parts = [apply_data_parallel(part, submodule(part, spec.blocks), dims, mesh, device) for part in parts]

    pm = ParallelModel(
        dims,
        parts,
        stage_ids,
        n_stages,
        None,
        groups.get("tp"),
        groups.get("dp"),
        groups.get("pp"),
        tied_sync,
        cfg.model,
        mesh,
        counts,
        measured,
    )
    if dims.pp > 1:
        from meshlm.parallel import pipeline

        pm.schedule = pipeline.build_schedule(
            parts,
            stage_ids,
            n_stages,
            groups["pp"],
            device,
            pipeline_microbatches(cfg, dims.dp),
            cfg.parallel.pp_schedule,
            _pipeline_loss(pm),
        )
    return pm


def _pipeline_loss(pm: ParallelModel) -> Callable:
    """The per-micro-batch mean loss the last stage computes (vocabulary-parallel under tp)."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return pm.loss(logits, targets, reduction="mean")

    return loss_fn
