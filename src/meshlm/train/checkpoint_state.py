"""What a sharded checkpoint holds, and how each rank's pieces map onto the global tensors.

Every tensor is stored under its single-device name and its single-device (global,
unpadded) shape, whatever layout wrote it:

    model/<name>                  a parameter, e.g. model/layers.3.attention.wq.weight
    optim/<name>/exp_avg          AdamW's first moment, same shape as the parameter
    optim/<name>/exp_avg_sq       AdamW's second moment
    rng/<rank>                    that rank's torch CPU (and CUDA) generator states (bytes)

Each rank describes what it holds of a tensor as *boxes*: a local tensor (a view of the live
storage) and its offsets in the global tensor. torch.distributed.checkpoint (DCP) writes each box
as a chunk of the global tensor and, at load, reads every box's region from whichever saved
chunks overlap it. So any layout loads any other: the boxes of the writer and the reader never
need to match.

    layout          what a rank holds of parameter P                       its boxes
    single process  all of P                                               one, at offset 0
    DDP (zero 0)    all of P (every dp replica)                            one (DCP writes replicas once)
    ZeRO-1/2        parameters: all of P; moments: the rank's range of     1 to 3 per parameter (a run of
                    the flat buffer, which may cut through P               row-major elements: partial first
                                                                           row, full rows, partial last row)
    FSDP2 (zero 3)  torch.chunk(P, dp)[dp_rank] along dim 0 (a DTensor)    one, at that chunk's offset
    HSDP            the same within a replica group                        one (replica groups deduplicated)
    TP              a slice along tp_shard_dim(name)                       shifted by tp_rank x slice size
    PP              only its stages' parameters                            -

Tensor parallelism pads the vocabulary (tok_embeddings / output rows) to a multiple of tp. The
padding is never saved: boxes are cut at row V, so the stored tensor is (V, d) for every tp
degree and each reader pads its own copy again (its pad rows stay zero). Because
ceil(V/tp) = V_pad/tp, rank r's valid rows are exactly torch.chunk's r-th chunk of V rows.

A tied output layer (gpt2, llama tie_embeddings) is stored once, as tok_embeddings.weight (with
its moments). A pipeline split keeps a copy of it on the last stage; that copy is never written
(stage 0 writes the original) and is loaded from the original's key.

Why not DTensor everywhere: ZeRO-1/2 shards cut through parameters, and FSDP2 chunks of a
vocabulary slice padded for tp are not torch.chunk chunks of the unpadded matrix, so neither is
a DTensor placement. Boxes describe all of them with one rule; the planners below hand them to
DCP (its documented extension point), which does the deduplication, the overlap and coverage
validation of the global plan, and the resharding reads.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import family_spec, meta_model
from meshlm.parallel.tp_plan import shard_rules


class UnsafeCheckpointEntry(ConfigError):
    """A non-tensor checkpoint entry whose pickle would import or call code."""


MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Box:
    offsets: tuple[int, ...]  # in the global tensor
    data: torch.Tensor  # a view of the live storage (or a staged copy)


@dataclass
class Sharded:
    """This rank's part of one global tensor. `source`: the checkpoint key to load it from
    (default: its own key; a tied copy loads from its original)."""

    size: torch.Size
    boxes: list[Box]
    source: str | None = None

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=b.data.shape) for b in self.boxes]

    def find(self, offsets: torch.Size) -> torch.Tensor:
        for b in self.boxes:
            if torch.Size(b.offsets) == offsets:
                return b.data
        raise KeyError(f"no box at offsets {tuple(offsets)}")

    def staged(self) -> Sharded:
        """A copy in CPU memory that later training steps do not change (async save)."""
        return Sharded(
            self.size, [Box(b.offsets, b.data.detach().to("cpu", copy=True)) for b in self.boxes], self.source
        )


@dataclass(frozen=True)
class ShardContext:
    """How this rank's tensors relate to the global ones: tensor-parallel position and global shapes."""

    model: ModelConfig
    tp: int
    tp_rank: int
    shapes: dict[str, torch.Size] = field(default_factory=dict)


def global_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Single-device parameter shapes (from a meta-device build: no memory)."""
    shapes = {name: p.shape for name, p in meta_model(cfg).named_parameters()}
    tied = family_spec(cfg).tied(cfg)
    if tied:
        shapes[tied[1]] = shapes[tied[0]]
    return shapes


def checkpoint_key(name: str, cfg: ModelConfig) -> str:
    """The stored name of parameter `name` (a tied output copy is stored as the embedding)."""
    tied = family_spec(cfg).tied(cfg)
    return tied[0] if tied and name == tied[1] else name


# ----------------------------------------------------------------------------- boxes


def range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Elements [start, stop) of the row-major flattening of `shape` as boxes
    (offsets, sizes, flat index of the box's first element), in order; their row-major
    flattenings concatenate to the range, so each is a contiguous slice of a flat buffer."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (stop - start,) if shape else (), start)]
    inner = math.prod(shape[1:])
    out = []
    row, col = divmod(start, inner)
    if col:  # partial first row
        end = min(stop, (row + 1) * inner)
        out += [((row, *o), (1, *s), f + row * inner) for o, s, f in range_boxes(shape[1:], col, end - row * inner)]
        start, row = end, row + 1
    full = (stop - start) // inner
    if full:
        out.append(((row,) + (0,) * (len(shape) - 1), (full, *shape[1:]), start))
        start, row = start + full * inner, row + full
    if start < stop:  # partial last row
        out += [((row, *o), (1, *s), f + start) for o, s, f in range_boxes(shape[1:], 0, stop - start)]
    return out


def to_global(name: str, boxes: list[Box], local_shape: torch.Size, ctx: ShardContext) -> list[Box]:
    """Boxes in this rank's (tensor-parallel, possibly vocab-padded) parameter -> boxes in the
    global parameter: shift along the tp dimension, cut the vocabulary padding, drop empties."""
    size = ctx.shapes[name]
    dim = shard_rules(ctx.model).shard_dim(name) if ctx.tp > 1 else None
    if dim is None:
        if tuple(local_shape) != tuple(size):
            raise ValueError(f"'{name}': local shape {tuple(local_shape)} but the model's is {tuple(size)}")
        return [b for b in boxes if b.data.numel()]
    base = ctx.tp_rank * local_shape[dim]
    out = []
    for b in boxes:
        start = b.offsets[dim] + base
        keep = max(0, min(b.data.shape[dim], size[dim] - start))  # rows past V are padding
        if keep == 0 or b.data.numel() == 0:
            continue
        offsets = list(b.offsets)
        offsets[dim] = start
        out.append(Box(tuple(offsets), b.data.narrow(dim, 0, keep)))
    return out


def sharded_like_param(name: str, tensor: torch.Tensor, ctx: ShardContext) -> Sharded:
    """A parameter, or optimizer state laid out like it: plain (replicated over dp, maybe
    tp-sliced) or an FSDP2 DTensor (dim-0 chunk over dp)."""
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        sizes, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(sizes) != tuple(local.shape):
            raise ValueError(
                f"'{name}': DTensor local shape {tuple(local.shape)} differs from its placement's {tuple(sizes)}"
            )
        boxes = [Box(tuple(offsets), local)]
    else:
        boxes = [Box((0,) * tensor.dim(), tensor)]
    return Sharded(ctx.shapes[name], to_global(name, boxes, tensor.shape, ctx))


def zero_moment_entries(zero, names: dict[int, str], ctx: ShardContext, for_load: bool = False) -> dict[str, Sharded]:
    """ZeroOptimizer's moments: each rank owns [lo, hi) of a flat buffer per dtype; the part
    of that range inside each parameter becomes row-major boxes."""
    out = {}
    for g in zero.groups:
        for s in g.segments:
            name = names[id(s.param)]
            key = checkpoint_key(name, ctx.model)
            if key != name and not for_load:
                continue
            a, b = max(g.lo, s.offset), min(g.hi, s.offset + s.numel)
            shape = tuple(s.param.shape)
            for moment in MOMENTS:
                flat = getattr(g, moment)
                boxes = []
                for offsets, sizes, first in range_boxes(shape, a - s.offset, b - s.offset):
                    lo = s.offset + first - g.lo
                    boxes.append(Box(offsets, flat[lo : lo + math.prod(sizes)].view(sizes)))
                out[f"optim/{name}/{moment}"] = Sharded(
                    ctx.shapes[name], to_global(name, boxes, s.param.shape, ctx), source=f"optim/{key}/{moment}"
                )
    return out


# ----------------------------------------------------------------------------- optimizer state


def ensure_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (as its first step would) where it is missing, so a
    checkpoint can be loaded into, or written from, an optimizer that has not stepped yet."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:  # as torch.optim.adam's _init_group
                on_device = group.get("fused") or group.get("capturable")
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if on_device
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                for moment in MOMENTS:
                    state[moment] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_steps(runner) -> int:
    if runner.zero is not None:
        return int(runner.zero.step_count)
    if runner.optimizer is None:
        return 0
    steps = {float(s["step"]) for s in runner.optimizer.state.values() if "step" in s}
    return int(max(steps)) if steps else 0


def set_optimizer_steps(runner, steps: int) -> None:
    if runner.zero is not None:
        runner.zero.step_count = steps
        return
    for state in runner.optimizer.state.values() if runner.optimizer is not None else ():
        if "step" in state:
            state["step"].fill_(float(steps))


def training_state(pm, runner, ctx: ShardContext, for_load: bool) -> dict[str, Sharded]:
    """model/* and optim/* entries for what this rank holds. For saving, tied copies are left
    out (the original is written by its own stage); for loading they read the original's key
    (several local entries may share one source)."""
    params = pm.named_parameters()
    names = {id(p): name for name, p in params}
    out: dict[str, Sharded] = {}
    # AdamW's moments are per parameter; plain SGD has no state; L-BFGS and EM keep theirs in the
    # runner (extra_state: replicated objects, stored pickled).
    adamw = runner.zero is None and isinstance(runner.optimizer, torch.optim.AdamW)
    if adamw:
        ensure_adamw_state(runner.optimizer)
    for name, p in params:
        key = checkpoint_key(name, ctx.model)
        if key != name and not for_load:
            continue
        out[f"model/{name}"] = dataclasses.replace(sharded_like_param(name, p, ctx), source=f"model/{key}")
        if adamw:
            state = runner.optimizer.state[p]
            for moment in MOMENTS:
                out[f"optim/{name}/{moment}"] = dataclasses.replace(
                    sharded_like_param(name, state[moment], ctx), source=f"optim/{key}/{moment}"
                )
    if runner.zero is not None:
        out.update(zero_moment_entries(runner.zero, names, ctx, for_load))
    extra = runner.extra_state() if hasattr(runner, "extra_state") else {}
    out.update({key: None if for_load else value for key, value in extra.items()})
    return out


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- DCP planners


class BoxSavePlanner(DefaultSavePlanner):
    """Writes Sharded entries box by box and anything else as pickled bytes. The default
    global planning (deduplication of replicated boxes, overlap and coverage checks) applies."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, value in self.state_dict.items():
            if isinstance(value, Sharded):
                items += [
                    WriteItem(
                        index=MetadataIndex(key, torch.Size(b.offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(b.offsets), b.data.shape),
                            properties=TensorProperties.create_from_tensor(b.data),
                            size=value.size,
                        ),
                    )
                    for b in value.boxes
                ]
            else:
                items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        value = self.state_dict[index.fqn]
        return value.find(index.offset) if isinstance(value, Sharded) else value


class BoxLoadPlanner(DefaultLoadPlanner):
    """Reads each Sharded entry's boxes (in place, into the live tensors) from its source key;
    bytes entries (whose value in the state dict is None) are unpickled into `self.loaded`."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.loaded: dict[str, object] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.original_state_dict = state_dict, state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        requests: list[ReadItem] = []
        for key, value in self.state_dict.items():
            source = (value.source if isinstance(value, Sharded) else None) or key
            md = stored.get(source)
            if md is None:
                raise ConfigError(
                    f"the checkpoint has no '{source}'; it was written for a different model or optimizer."
                )
            if not isinstance(value, Sharded):
                requests.append(
                    ReadItem(
                        type=LoadItemType.BYTE_IO,
                        dest_index=MetadataIndex(key),
                        dest_offsets=torch.Size((0,)),
                        storage_index=MetadataIndex(source),
                        storage_offsets=torch.Size((0,)),
                        lengths=torch.Size((0,)),
                    )
                )
                continue
            if not isinstance(md, TensorStorageMetadata) or md.size != value.size:
                saved = tuple(md.size) if isinstance(md, TensorStorageMetadata) else "bytes"
                raise ConfigError(
                    f"checkpoint tensor '{source}' has shape {saved}, this model's is {tuple(value.size)}."
                )
            for item in create_read_items_for_chunk_list(source, md, value.chunks()):
                requests.append(dataclasses.replace(item, dest_index=dataclasses.replace(item.dest_index, fqn=key)))
        return LoadPlan(requests)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # weights_only: the unpickler accepts tensors and plain containers (all the trainer writes:
        # RNG states) and refuses anything that would import and call code, before calling it.
        key = read_item.dest_index.fqn
        try:
            self.loaded[key] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointEntry(
                f"checkpoint entry '{key}' is not plain tensor data: its pickle would run code when loaded "
                f"({reason}); it was refused without running it. A checkpoint written by meshlm never holds such "
                f"an entry: do not use this checkpoint unless you know who made it and why."
            ) from None

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].find(index.offset)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the live tensor: the read already landed in place
