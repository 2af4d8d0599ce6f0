"""Cutting the single-device Transformer into pipeline stages, and placing stages on ranks.

Pure functions of the config and the model: no process group is touched here, so the
split can be planned (and tested) before any process starts.

    stage_layer_counts   how many consecutive blocks each stage gets ("auto", "measured" or a list)
    stage_ids_for_rank   which stages a pipeline rank holds (one; looped; or the zbv "V")
    build_stage_module   a copy of the model pruned to one stage, parameter names unchanged
    build_part           a copy pruned to any blocks, with or without the first / last modules
    TiedEmbeddingSync    sums the gradients of the two copies of a tied embedding that a
                         split over ranks creates (the only part here that communicates)
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from meshlm.config import MULTI_STAGE_SCHEDULES, PIPELINE_SCHEDULES, Config, ConfigError
from meshlm.model.registry import family_spec
from meshlm.model.spec import StageCosts, submodule
from meshlm.parallel.stage_balance import balanced_layer_counts
from meshlm.parallel.wrappers import clean_name, local_tensor


def stage_layer_counts(cfg: Config, n_stages: int, measured: StageCosts | None = None) -> list[int]:
    """Blocks ("layers") per pipeline stage, first to last.

    An explicit `parallel.pp_split` list is returned as given (after checking it has one
    positive entry per stage and sums to the model's blocks).

    "measured" balances `measured`, the per-block times of parallel.block_timing (seconds of
    forward + backward of each block, of the first-stage and of the last-stage modules with
    the loss), with the same rule as "auto".

    "auto" balances compute with the family's costs (`FamilySpec.stage_costs`; for the
    transformer, matmul parameters per token, proportional to training FLOPs per token):
      - each block costs its own work (transformer: attention q, k, v, o + MLP),
      - the last stage also pays for the final norm + output projection (vocab x d_model, as
        much as the projection's matmul: e.g. 1.3 blocks for tiny-cpu, 5.5 for gpt2-124m),
      - the first stage also pays for the embedding, whose forward is a gather and backward a
        scatter-add: about d_model per token, no matmul, so in practice a tie-breaker only.
    The split minimises the most expensive stage, every stage holding at least one layer. Among
    the splits reaching that minimum, the one with the smallest sum of squared stage costs (the
    most even) wins, and remaining ties give earlier stages fewer layers: in 1F1B the first
    stages keep the most micro-batches in flight, hence the most activations.
    Examples: gpt2-124m (12 layers, output = 5.5 blocks) over 4 stages -> [3, 4, 4, 1];
    6 equal layers with a small vocabulary over 4 stages -> [1, 2, 2, 1].
    """
    costs = family_spec(cfg).stage_costs(cfg.model)
    n_layers = len(costs.blocks)
    split = cfg.parallel.pp_split
    if split == "measured":
        if measured is None or len(measured.blocks) != n_layers:
            raise ValueError(f'parallel.pp_split="measured" needs the {n_layers} blocks\' measured costs')
        costs = measured
    if isinstance(split, list):
        if len(split) != n_stages or sum(split) != n_layers or any(n <= 0 for n in split):
            raise ConfigError(
                f"parallel.pp_split {split} must list {n_stages} positive layer counts (one per pipeline stage) "
                f"summing to model.n_layers ({n_layers})."
            )
        return list(split)
    if n_stages <= 0 or n_layers < n_stages:
        raise ConfigError(
            f"cannot split model.n_layers ({n_layers}) into {n_stages} pipeline stages of at least one layer each."
        )
    return balanced_layer_counts(costs, n_stages)


def stage_ids_for_rank(pp_rank: int, pp: int, schedule: str, stages_per_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, ascending.

    gpipe, 1f1b: one stage, [pp_rank].
    interleaved-1f1b, interleaved-zero-bubble: looped, [r, r + pp, r + 2 pp, ...].
    zbv: the V, [r, 2 pp - 1 - r]: rank 0 holds the first and the last stage.
    """
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(PIPELINE_SCHEDULES)}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, {pp})")
    if schedule not in MULTI_STAGE_SCHEDULES:
        if stages_per_rank != 1:
            raise ValueError(f"the {schedule} schedule runs one stage per rank, got stages_per_rank={stages_per_rank}")
        return [pp_rank]
    if schedule == "zbv":
        if stages_per_rank != 2:
            raise ValueError(f"the zbv schedule runs exactly 2 stages per rank, got stages_per_rank={stages_per_rank}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def stage_pp_rank(stage_id: int, pp: int, schedule: str, stages_per_rank: int) -> int:
    """The pipeline rank that holds `stage_id` (the inverse of `stage_ids_for_rank`)."""
    for r in range(pp):
        if stage_id in stage_ids_for_rank(r, pp, schedule, stages_per_rank):
            return r
    raise ValueError(f"stage {stage_id} does not exist with pp={pp} and {stages_per_rank} stages per rank")


def stage_layer_range(stage_id: int, layer_counts: list[int]) -> range:
    """The (global) layer indices of a stage."""
    start = sum(layer_counts[:stage_id])
    return range(start, start + layer_counts[stage_id])


def build_stage_module(model: nn.Module, stage_id: int, n_stages: int, layer_counts: list[int]) -> nn.Module:
    """A deep copy of `model` keeping only what stage `stage_id` runs.

    The blocks keep their original keys (stage 1 of [2, 2] holds layers "2" and "3"), so
    parameter names, checkpoints and optimizer state line up with the single-device model.
    The family's first-stage modules (embeddings) live on stage 0 only, its last-stage modules
    (final norm, output layer) on the last stage only; the model's forward then takes and
    returns hidden states (B, T, d) in between (the FamilySpec contract).

    Tied embeddings split over two stages: the last stage's output.weight becomes its own copy
    (equal values), no longer shared with tok_embeddings; the two copies' gradients must be
    summed after every backward (pipeline.TiedEmbeddingSync). A single stage (n_stages == 1)
    keeps the tie. The dropped parts are never copied, so the peak memory is one stage.
    """
    if len(layer_counts) != n_stages or not 0 <= stage_id < n_stages:
        raise ValueError(f"stage {stage_id} of {n_stages} with layer counts {layer_counts}")
    blocks = submodule(model, family_spec(model.cfg).blocks)
    if sum(layer_counts) != len(blocks):
        raise ValueError(f"layer counts {layer_counts} do not sum to the model's {len(blocks)} blocks")
    keep = {str(i) for i in stage_layer_range(stage_id, layer_counts)}
    return build_part(model, keep, first=stage_id == 0, last=stage_id == n_stages - 1)


def build_part(model: nn.Module, keep: set[str], first: bool, last: bool) -> nn.Module:
    """A deep copy of `model` with only the blocks named in `keep` (possibly none), and the
    first-stage / last-stage modules only if asked for (see build_stage_module)."""
    spec = family_spec(model.cfg)
    blocks = submodule(model, spec.blocks)
    dropped = [block for name, block in blocks.items() if name not in keep]
    if not first:
        dropped += [m for m in (submodule(model, name) for name in spec.first_stage) if m is not None]
    if not last:
        dropped += [m for m in (submodule(model, name) for name in spec.last_stage) if m is not None]
    # deepcopy returns what the memo holds for an object it has seen: the dropped modules become
    # None without being copied. A parameter shared with a dropped module (the tied output weight
    # on the last stage) is itself not in the memo, so it is copied: the stage owns its copy.
    stage = copy.deepcopy(model, memo={id(m): None for m in dropped})
    stage_blocks = submodule(stage, spec.blocks)
    for name in [name for name, block in stage_blocks.items() if block is None]:
        del stage_blocks[name]
    return stage


# ----------------------------------------------------------------------------- tied embeddings


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and tensor parallel keep the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class TiedEmbeddingSync:
    """Keeps the two copies of a tied embedding in step when stage 0 and the last stage differ.

    build_stage_module gives the last stage its own copy of the tied matrix (output.weight,
    equal to stage 0's tok_embeddings.weight). The single-device gradient of the shared matrix
    is the sum of both uses, so after every backward both copies must hold
    grad(tok_embeddings) + grad(output): then identical optimizers keep them identical.

    Construct it on every rank, in the same order relative to other group creations: it calls
    dist.new_group collectively, one group per (dp, tp) coordinate pairing the rank with
    pp_rank 0 and the rank holding the last stage (pp_rank pp - 1, or pp_rank 0 itself for zbv,
    where both copies live on one rank and are summed locally). Under tensor parallel / FSDP the
    two copies are sharded alike (vocab rows), so their local shards are summed.
    It keeps references to the stage models and looks the copies up at each call, so the later
    steps (tensor parallel swapping in vocab-parallel modules, FSDP2, DDP around the stage) are
    seen; build it right after splitting. Untied models: a no-op.
    """

    def __init__(self, stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int, schedule_name: str, dims):
        models = {s: _unwrap(m) for s, m in zip(stage_ids, stage_modules)}
        cfg = next(iter(models.values())).cfg
        self.tied = family_spec(cfg).tied(cfg)  # ("tok_embeddings.weight", "output.weight") or None
        self.active = n_stages > 1 and self.tied is not None
        # The stage models themselves, not their embedding / output submodules: tensor parallel
        # may replace those (vocab-parallel modules), the stage objects stay.
        self._first = models.get(0)
        self._last = models.get(n_stages - 1)
        self.group = None
        if not self.active:
            return
        last_pp = stage_pp_rank(n_stages - 1, dims.pp, schedule_name, len(stage_ids))
        if last_pp != 0:
            pairs = [
                [dims.rank_of(0, d, t), dims.rank_of(last_pp, d, t)] for d in range(dims.dp) for t in range(dims.tp)
            ]
            self.group, _ = dist.new_subgroups_by_enumeration(pairs)
            if (self._first is not None or self._last is not None) and self.group is None:
                raise RuntimeError(f"rank {dist.get_rank()} holds a tied embedding copy but is in no pair {pairs}")

    def _copies(self) -> list[torch.Tensor]:
        source, copy_ = self.tied
        copies = [self._first.get_parameter(source)] if self._first is not None else []
        return copies + ([self._last.get_parameter(copy_)] if self._last is not None else [])

    @torch.no_grad()
    def sync_tied_embedding_grads(self) -> None:
        """Sum the two copies' gradients into both. Call after the schedule's backward (and after
        data-parallel gradient reduction, which it commutes with), before clipping."""
        if not self.active or not self._copies():
            return
        grads = []
        for weight in self._copies():
            if weight.grad is None:
                raise RuntimeError("sync_tied_embedding_grads() needs gradients: call it after the backward pass")
            grads.append(local_tensor(weight.grad))
        if len(grads) == 2:  # zbv: both copies on this rank
            if grads[0].shape != grads[1].shape:
                raise RuntimeError(
                    f"tied copies are sharded differently: {tuple(grads[0].shape)} vs {tuple(grads[1].shape)}"
                )
            total = grads[0] + grads[1]
            grads[0].copy_(total)
            grads[1].copy_(total)
        else:
            dist.all_reduce(grads[0], group=self.group)

    @torch.no_grad()
    def broadcast_tied_weights(self) -> None:
        """Copy stage 0's embedding into the last stage's output weight (e.g. after loading a
        checkpoint written by another layout). Collective over the pairs."""
        if not self.active or not self._copies():
            return
        copies = [local_tensor(w) for w in self._copies()]
        if len(copies) == 2:
            copies[1].copy_(copies[0])
        else:  # group rank 0 is the pp_rank 0 member (the lower global rank)
            dist.broadcast(copies[0], group=self.group, group_src=0)

    def tied_copies(self, fqn: str) -> int:
        """How many copies of this parameter exist over the pipeline: 2 for a split tied
        embedding ("tok_embeddings.weight" on stage 0, "output.weight" on the last stage),
        else 1. A global gradient norm weights each copy's squared norm by 1 / tied_copies,
        so after the sync the tied matrix counts once, as on a single device. Wrapper prefixes
        (module., _orig_mod., _fsdp_wrapped_module., _checkpoint_wrapped_module.) are ignored."""
        fqn = clean_name(fqn)
        return 2 if self.active and fqn in self.tied else 1

    def copies_of(self, param: torch.Tensor) -> int:
        """Same as tied_copies, by parameter identity."""
        return 2 if self.active and any(param is w for w in self._copies()) else 1
