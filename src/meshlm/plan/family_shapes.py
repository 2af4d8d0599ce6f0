"""What the planner knows about a family from its spec alone: parameters per pipeline part and
per tensor-parallel rank, the activations a micro-batch keeps, the widths crossing stage and
tensor-parallel boundaries, and the vocabulary-parallel reductions, all read from the family's
own model built on the meta device (no memory, no compute) and its FamilySpec.

Used for every family the detailed attention-block model (shapes.py, compute.py) does not
describe. Nothing here names a family: the parts are the spec's `first_stage`, `blocks` and
`last_stage`; the tensor-parallel split of each parameter is its module's style in the spec's
`tp_plan`; the tensor-parallel collectives are the plan's `regions` (Megatron's f and g: one
all-reduce each way per call) and the calls the model makes on a `vocab_columns` module's
`vocab_ops` (each logsumexp two all-reduces: max and sum; each select and each `enter` one),
counted by running the model's forward on meta tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from meshlm.config import ModelConfig
from meshlm.model.loss import lm_loss
from meshlm.model.registry import family_spec
from meshlm.model.spec import submodule
from meshlm.plan.shapes import model_from_key, model_key

# The attributes the detailed attention-block model reads (shapes.py, compute.py, memory.py).
_BLOCK_MODEL_KEYS = ("arch", "d_model", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_dim")


def has_block_model(m: ModelConfig) -> bool:
    """Whether the detailed attention + MLP block model describes this [model] section (llama
    and gpt2 blocks, counted from their code); every other model is planned from its spec."""
    return all(hasattr(m, k) for k in _BLOCK_MODEL_KEYS) and getattr(m, "arch", None) in ("llama", "gpt2")


@dataclass(frozen=True)
class Inventory:
    """One family model, one tensor-parallel degree (`tp`), per micro-batch of one sequence."""

    costs: tuple[float, ...]  # relative compute per token: first part, each block, last part (StageCosts)
    numel: tuple[int, ...]  # parameters per part on one tp rank
    numel_full: tuple[int, ...]  # ... without tensor parallelism
    tensors: tuple[int, ...]  # parameter tensors per part
    shapes: tuple[tuple[tuple[int, int], ...], ...]  # per part, (rows, rest) of each tensor on one tp rank
    activations: tuple[float, ...]  # bytes kept for backward per part, one sequence, float32
    block_input: float  # elements entering a block (a pipeline message), one sequence
    tp_allreduce: float  # elements all-reduced over the tp group per sequence, forward + backward
    tp_allreduces: int  # how many all-reduces that is (each pays the latency)

    def compute_share(self, part: int) -> float:
        """The share of a part's compute one tp rank does: its share of the part's parameters
        (a split matrix splits its products); a part without parameters (work over a split
        part's outputs) follows the whole model's share."""
        full = self.numel_full[part] or sum(self.numel_full)
        return (self.numel[part] if self.numel_full[part] else sum(self.numel)) / full if full else 1.0


def _matches(pattern: str, path: str) -> bool:
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(x in ("*", y) for x, y in zip(a, b))


def _style(styles: dict, module_path: str) -> str | None:
    return next((s for pat, s in styles.items() if _matches(pat, module_path)), None)


def _rank_shape(shape: tuple[int, ...], style: str | None, is_weight: bool, tp: int) -> tuple[int, int]:
    """(rows, rest) of a parameter on one of `tp` ranks under its module's style."""
    dims = list(shape) or [1]
    if tp > 1:
        if style == "column":
            dims[0] = -(-dims[0] // tp)
        elif style == "row" and is_weight and len(dims) > 1:
            dims[1] = -(-dims[1] // tp)
        elif style == "vocab_output" or (style == "vocab_embedding" and is_weight):
            dims[0] = -(-dims[0] // tp)  # the output layer's bias is split with its rows
        elif style == "vocab_columns":
            dims[-1] = -(-dims[-1] // tp)
    rest = 1
    for d in dims[1:]:
        rest *= d
    return dims[0], rest


class _CountingVocabOps:
    """Stands in for a vocab_columns module's `vocab_ops` during the meta pass: the same local
    results, and a count of the elements each call would all-reduce under tensor parallelism."""

    def __init__(self, inner, tally: list):
        self.inner, self.tally = inner, tally

    def logsumexp(self, x):
        out = self.inner.logsumexp(x)
        self.tally += [out.numel(), out.numel()]  # max, then the sum of exponentials
        return out

    def select(self, table, tokens):
        out = self.inner.select(table, tokens)
        self.tally.append(out.numel())
        return out

    def enter(self, x):
        self.tally.append(x.numel())  # the backward's sum over ranks
        return self.inner.enter(x)


def meta_model(m: ModelConfig):
    """The family's full model on the meta device: shapes without memory (built once per config;
    callers leave it as they found it)."""
    return _meta_model(model_key(m))


@functools.lru_cache(maxsize=16)
def _meta_model(mkey: tuple):
    m = model_from_key(mkey)
    with torch.device("meta"):
        return family_spec(m).model_class(m)


@functools.lru_cache(maxsize=256)
def rank_parameters(mkey: tuple, tp: int) -> tuple:
    """(numel, numel_full, tensors, shapes) per part (first, each block, last) on one of `tp` ranks."""
    m = model_from_key(mkey)
    spec = family_spec(m)
    plan = spec.tp_plan(m) if not spec.capabilities.tensor_parallel else None
    styles = plan.styles if plan else {}
    model = meta_model(m)
    blocks = submodule(model, spec.blocks)
    block_names = list(blocks.keys()) if blocks is not None else []
    n_parts = len(block_names) + 2
    numel, full, tensors = [0] * n_parts, [0] * n_parts, [0] * n_parts
    shapes: list[list] = [[] for _ in range(n_parts)]
    tied = spec.tied(m)
    for name, p in model.named_parameters():
        if tied and name == tied[1]:
            continue
        module_path, _, leaf = name.rpartition(".")
        if name.startswith(spec.blocks + "."):
            part = 1 + block_names.index(name[len(spec.blocks) + 1 :].split(".")[0])
        elif any(name.startswith(s + ".") for s in spec.last_stage):
            part = n_parts - 1
        else:
            part = 0
        rows, rest = _rank_shape(tuple(p.shape), _style(styles, module_path), leaf == "weight", tp)
        numel[part] += rows * rest
        full[part] += p.numel()
        tensors[part] += 1
        shapes[part].append((rows, rest))
    return tuple(numel), tuple(full), tuple(tensors), tuple(tuple(x) for x in shapes)


@functools.lru_cache(maxsize=256)
def inventory(mkey: tuple, seq_len: int, tp: int) -> Inventory:
    m = model_from_key(mkey)
    spec = family_spec(m)
    costs = spec.stage_costs(m)
    plan = spec.tp_plan(m) if not spec.capabilities.tensor_parallel else None
    styles = plan.styles if plan else {}
    numel, full, tensors, shapes = rank_parameters(mkey, tp)
    model = meta_model(m)
    blocks = submodule(model, spec.blocks)
    block_names = list(blocks.keys()) if blocks is not None else []
    n_parts = len(block_names) + 2

    # One sequence through forward and loss on meta tensors: what autograd saves, per part.
    saved = [0.0] * n_parts
    current = [0]
    block_input = [0.0]

    def enter_block(index):
        def hook(_module, args):
            current[0] = index
            if args and torch.is_tensor(args[0]):
                block_input[0] = max(block_input[0], float(args[0].numel()))

        return hook

    handles = [blocks[b].register_forward_pre_hook(enter_block(1 + i)) for i, b in enumerate(block_names)]
    if block_names:
        handles.append(blocks[block_names[-1]].register_forward_hook(lambda *_: current.__setitem__(0, n_parts - 1)))
    region_elems, region_calls = [0.0], [0]

    def enter_region(_module, args):
        region_elems[0] += args[0].numel()
        region_calls[0] += 1

    for pattern in plan.regions if plan else ():
        for path, module in model.named_modules():
            if path and _matches(pattern, path):
                handles.append(module.register_forward_pre_hook(enter_region))
    vocab_calls: list[int] = []
    swapped = []
    for path, module in model.named_modules():
        if path and _style(styles, path) == "vocab_columns" and hasattr(module, "vocab_ops"):
            swapped.append((module, module.vocab_ops))
            module.vocab_ops = _CountingVocabOps(module.vocab_ops, vocab_calls)

    def pack(t):
        if t.dtype.is_floating_point:
            saved[current[0]] += t.numel() * 4
        return t

    x = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(model(x), x)
    finally:
        for h in handles:
            h.remove()
        for module, ops in swapped:
            module.vocab_ops = ops
    has_vocab_split = any(s in ("vocab_output", "vocab_columns") for s in styles.values())
    # f and g of each region: one all-reduce forward, one backward; the vocabulary-parallel
    # cross-entropy: max, sum of exponentials and the target's logit (forward).
    elems = 2 * region_elems[0] + sum(vocab_calls) + (3 * seq_len if has_vocab_split else 0)
    calls = 2 * region_calls[0] + len(vocab_calls) + (3 if has_vocab_split else 0)
    return Inventory(
        (float(costs.first), *map(float, costs.blocks), float(costs.last)),
        numel,
        full,
        tensors,
        shapes,
        tuple(saved),
        block_input[0],
        float(elems) if tp > 1 else 0.0,
        calls if tp > 1 else 0,
    )
