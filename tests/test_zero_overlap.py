"""ZeRO-1/2 with the reduce-scatters overlapped with the backward (`overlap_backward`): the same
bits as reducing after the backward, parity with single-process AdamW (test_zero's reference
and tolerances), buckets really launched before the backward ends, and the packing that makes
them ready early. float32, ranks forked per world."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from test_zero import TRAIN, all_references, check_bytes, check_parity, data, loss_fn, make_model

from meshlm.distributed.spawn import run_distributed
from meshlm.parallel.zero import ZeroOptimizer
from meshlm.parallel.zero_buckets import bucket_ranges, buckets_of, readiness_packing
from meshlm.train.optim import lr_at

STEPS = 5


def train(kind, group, stage, accum, bucket_bytes, overlap, model_zero_grad=False):
    """test_zero's loop, the last micro-batch's backward optionally inside overlap_backward().
    Returns the model, its losses and norms, and for each step the fraction of buckets already
    launched when the gradient of the parameter that becomes final last (the first one) did."""
    model = make_model(kind)
    first = next(model.parameters())
    launched_before_end: list[float] = []
    opt = None

    def at_end(param):  # registered before the optimizer's own hook, so it runs first
        if opt is not None and opt._armed:
            launched_before_end.append(opt.schedule.next / len(opt.schedule.order))

    first.register_post_accumulate_grad_hook(at_end)
    opt = ZeroOptimizer(model, group, stage, TRAIN, bucket_bytes=bucket_bytes)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    losses, norms = [], []
    for step in range(STEPS):
        local = data(kind)[step].chunk(n)[r]
        total = torch.zeros(())
        micros = local.chunk(accum)
        for i, micro in enumerate(micros):
            loss = loss_fn(kind, model, micro) / accum
            if overlap and i == len(micros) - 1:
                with opt.overlap_backward():
                    loss.backward()
            else:
                loss.backward()
            total += loss.detach()
        opt.reduce_gradients()
        sq = opt.grad_sq_sum()
        dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
        opt.step(lr_at(step, TRAIN), (TRAIN.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        opt.zero_grad()
        if model_zero_grad:
            model.zero_grad(set_to_none=True)
        dist.all_reduce(total, group=group)
        losses.append(total.item() / n)
        norms.append(norm.item())
    return model, opt, losses, norms, launched_before_end


def overlap_cases(rank, refs, cases):
    group = dist.new_group(list(range(dist.get_world_size())))
    early = {}
    for kind, stage, accum, bucket_bytes, zero_grad in cases:
        plain, *_ = train(kind, group, stage, accum, bucket_bytes, overlap=False)
        model, opt, losses, norms, before_end = train(kind, group, stage, accum, bucket_bytes, True, zero_grad)
        check_parity(kind, model, losses, norms, refs[kind])
        check_bytes(model, opt, stage, dist.get_world_size(group))
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.equal(p, q), f"{kind} stage {stage}: {name} differs from reducing after the backward"
        assert len(before_end) == STEPS
        early[(kind, stage)] = min(before_end)
    # A parameter used in two backward passes under overlap_backward is refused, not mis-reduced.
    model = make_model("toy")
    opt = ZeroOptimizer(model, group, 1, TRAIN, bucket_bytes=64)
    with pytest.raises(RuntimeError, match="second gradient"):
        with opt.overlap_backward():
            loss_fn("toy", model, data("toy")[0]).backward()
            loss_fn("toy", model, data("toy")[0]).backward()
    return early


@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_reduce_scatter_is_exact_and_early(world):
    cases = [
        ("llama", 1, 2, 4096, True),  # many buckets; fresh p.grad after model.zero_grad
        ("llama", 2, 1, 4096, False),
        ("gpt2", 2, 2, 4096, False),
        ("toy", 1, 1, 25 * 2**20, False),  # one bucket: launched when the last gradient is final
    ]
    if world == 4:
        cases = [("llama", 2, 2, 4096, False), ("gpt2", 1, 1, 4096, False)]
    early = run_distributed(overlap_cases, world, all_references(), cases)[0]
    # With many small buckets most are on the wire before the backward ends (the embedding,
    # whose gradient is final last, fills the last buckets of one shard).
    for key, fraction in early.items():
        if key[0] != "toy":
            assert fraction >= 0.4, (key, fraction)


def test_readiness_packing():
    # Equal parameters are dealt to the two sides of the pair of shards: offset j of shard 0 and
    # the mirrored offset of shard 1 hold parameters that become final together.
    assert readiness_packing([10] * 8, 2) == [0, 70, 10, 60, 20, 50, 30, 40]
    rng = random.Random(0)
    for n in (2, 3, 4, 8):
        for _ in range(50):
            sizes = [rng.choice([1, 7, 64, 300, 1000]) for _ in range(rng.randint(1, 60))]
            offsets = readiness_packing(sizes, n)
            spans = sorted(zip(offsets, sizes))
            assert spans[0][0] == 0 and all(a + s == b for (a, s), (b, _) in zip(spans, spans[1:]))
            shard = -(-sum(sizes) // n)
            if n > 2 or len(sizes) < 8 or max(sizes) > shard / 4:
                continue
            # dp 2, 4 buckets: the first is ready once at most half the gradient is final, the
            # last no earlier than the others
            done, final_at = 0, []
            for size in sizes:
                done += size
                final_at.append(done / sum(sizes))
            per_rank = -(-shard // 4)
            ready = [
                max(final_at[i] for i in range(len(sizes)) if k in buckets_of(offsets[i], sizes[i], shard, per_rank, n))
                for k in range(len(bucket_ranges(shard, per_rank)))
            ]
            assert ready[0] <= 0.5 and ready[-1] == max(ready), (sizes, ready)
