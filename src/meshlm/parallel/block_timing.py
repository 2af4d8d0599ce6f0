"""What each pipeline block really costs: forward + backward timed on this device.

`parallel.pp_split = "measured"` splits the model where these times balance, instead of where
the family's cost model (`FamilySpec.stage_costs`: matmul parameters) says they do. The two part
ways wherever the cost model leaves something out: the loss and softmax over the vocabulary,
attention's T^2 term, memory-bound norms and activations, a CPU's slow embedding backward, or
blocks of uneven shape that a family's spec does not describe.

    costs = measure_stage_costs(model, micro_batch, seq_len, device)   # StageCosts in seconds
    counts = pipeline_split.stage_layer_counts(cfg, n_stages, measured=costs)

Each part is timed as a pipeline stage would run it, through the model's own forward (the
FamilySpec contract: a copy pruned with `build_part`): the first-stage modules alone (token
ids in, hidden states out), each block alone (hidden states in and out, the input gradient
computed as a later stage computes it), the last-stage modules with the loss. One warm-up,
then the median of `iterations` forward + backward passes. Only one block is copied at a time.

Every rank measures on its own device; `agreed_stage_costs` averages the times over the ranks
and hands rank 0's result to all, so every rank makes the same split. The agreed times are in
whole microseconds, rounded to 1/10 of the median block's, so that equal blocks measure equal
and noise does not move a cut.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from meshlm.model.loss import lm_loss
from meshlm.model.registry import family_spec
from meshlm.model.spec import StageCosts, submodule
from meshlm.parallel.pipeline_split import build_part


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_part(part: nn.Module, make_input, finish, iterations: int, device: torch.device) -> float:
    """Median seconds of forward + backward of `part`."""
    times = []
    for i in range(iterations + 1):
        x = make_input()
        _sync(device)
        started = time.perf_counter()
        finish(part(x)).backward()
        _sync(device)
        if i:  # the first pass warms up (allocations, kernel selection)
            times.append(time.perf_counter() - started)
        part.zero_grad(set_to_none=True)
    return statistics.median(times)


def measure_stage_costs(
    model: nn.Module, micro_batch: int, seq_len: int, device: torch.device, iterations: int = 3
) -> StageCosts:
    """Seconds of forward + backward of the first-stage modules, of each block and of the
    last-stage modules with the loss, for one micro-batch of (micro_batch, seq_len) tokens."""
    spec = family_spec(model.cfg)
    vocab = model.cfg.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator).to(device)
    targets = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator).to(device)
    was_training = model.training
    model.train()
    try:
        first = build_part(model, set(), first=True, last=False)
        with torch.no_grad():
            hidden = first(ids).detach()
        gradient = torch.randn(hidden.shape, generator=generator).to(device, hidden.dtype)

        def as_stage_input() -> torch.Tensor:
            return hidden.clone().requires_grad_(True)

        def send_back(out: torch.Tensor) -> torch.Tensor:  # as a later stage's gradient arrives
            return (out * gradient).sum()

        first_s = _time_part(first, lambda: ids, send_back, iterations, device)
        del first
        blocks = []
        for name in submodule(model, spec.blocks):
            part = build_part(model, {name}, first=False, last=False)
            blocks.append(_time_part(part, as_stage_input, send_back, iterations, device))
            del part
        last = build_part(model, set(), first=False, last=True)

        def loss(out: torch.Tensor) -> torch.Tensor:  # a language model's loss; a task head's output: its gradient
            if out.shape[-1] == vocab and out.shape[:-1] == targets.shape:
                return lm_loss(out, targets)
            return out.float().square().mean()

        last_s = _time_part(last, as_stage_input, loss, iterations, device)
    finally:
        model.train(was_training)
    return StageCosts(first=first_s, blocks=blocks, last=last_s)


def rounded(costs: StageCosts, steps_per_block: int = 10) -> StageCosts:
    """Seconds -> whole microseconds, rounded to a multiple of 1/steps_per_block of the median
    block's time. Integers: the splitter's sums and ties are then exact."""
    unit = max(1, round(statistics.median(costs.blocks) * 1e6 / steps_per_block))

    def r(x: float) -> int:
        return round(x * 1e6 / unit) * unit

    return StageCosts(first=r(costs.first), blocks=[r(b) for b in costs.blocks], last=r(costs.last))


def agreed_stage_costs(costs: StageCosts, device: torch.device) -> StageCosts:
    """The ranks' mean times (rank 0's copy on every rank), rounded (`rounded`: microseconds):
    the same split everywhere."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = torch.tensor([costs.first, *costs.blocks, costs.last], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        values /= dist.get_world_size()
        dist.broadcast(values, src=0)
        first, *blocks, last = values.tolist()
        costs = StageCosts(first=first, blocks=blocks, last=last)
    return rounded(costs)


def stage_seconds(costs: StageCosts, counts: list[int]) -> list[float]:
    """Each stage's time under `costs` (in their unit) for a split into `counts` blocks per stage."""
    out, start = [], 0
    for s, k in enumerate(counts):
        t = sum(costs.blocks[start : start + k])
        t += (costs.first if s == 0 else 0.0) + (costs.last if s == len(counts) - 1 else 0.0)
        out.append(t)
        start += k
    return out
