"""parallel.pp_split = "measured": the split balances measured per-block times. Deterministic for
given times (injected here), never worse than the count split under those times, the same in
the planner, and, measured for real on a model with uneven blocks, a pipeline that matches
the single device."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import uneven_family
from test_pipeline import _check_grads, _reference

from meshlm.config import Config, load_config
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.distributed.spawn import run_distributed
from meshlm.model.registry import build_model
from meshlm.model.spec import StageCosts
from meshlm.parallel.block_timing import rounded, stage_seconds
from meshlm.parallel.parallelize import parallelize
from meshlm.parallel.pipeline import pipeline_step
from meshlm.parallel.pipeline_split import stage_layer_counts
from meshlm.plan import shapes


def _cfg(n_layers: int, split="auto") -> Config:
    cfg = Config()
    cfg.model = uneven_family.UnevenConfig(d_model=32, n_layers=n_layers, n_heads=4, vocab_size=64, max_seq_len=16)
    cfg.parallel.pp_split = split
    return cfg


def _random_costs(rng: random.Random, n_layers: int) -> StageCosts:
    return StageCosts(
        first=rng.uniform(0, 2),
        blocks=[rng.choice([1.0, 1.0, 3.0, 7.5]) for _ in range(n_layers)],
        last=rng.uniform(0, 4),
    )


def test_measured_split_is_deterministic_never_worse_and_the_planners():
    rng = random.Random(0)
    for _ in range(200):
        n_layers = rng.randint(2, 12)
        n_stages = rng.randint(2, min(4, n_layers))
        costs = _random_costs(rng, n_layers)
        measured = stage_layer_counts(_cfg(n_layers, "measured"), n_stages, costs)
        assert measured == stage_layer_counts(_cfg(n_layers, "measured"), n_stages, StageCosts(**vars(costs)))
        assert sum(measured) == n_layers and min(measured) >= 1
        by_count = stage_layer_counts(_cfg(n_layers), n_stages)  # the family's cost model: equal blocks
        even = shapes.stage_layer_counts(_cfg(n_layers).model, n_stages, "even")
        worst = max(stage_seconds(costs, measured))
        assert worst <= max(stage_seconds(costs, by_count)) + 1e-12
        assert worst <= max(stage_seconds(costs, list(even))) + 1e-12
        assert shapes.stage_layer_counts(_cfg(n_layers).model, n_stages, "measured", costs) == tuple(measured)
    # an uneven model: the count split puts the three wide blocks on one stage, the measured one does not
    costs = StageCosts(first=0.1, blocks=[4.0, 4.0, 4.0, 1, 1, 1, 1, 1], last=0.5)
    assert stage_layer_counts(_cfg(8), 2) == [4, 4]
    assert stage_layer_counts(_cfg(8, "measured"), 2, costs) == [2, 6]
    with pytest.raises(ValueError, match="measured costs"):
        stage_layer_counts(_cfg(8, "measured"), 2)


def test_rounding_keeps_noise_from_moving_a_cut():
    """Equal blocks measured with 2% noise round to equal times: the split is the tie-break's."""
    rng = random.Random(1)
    for _ in range(50):
        noisy = StageCosts(first=0.0, blocks=[1.0 + rng.uniform(-0.02, 0.02) for _ in range(8)], last=0.0)
        assert len(set(rounded(noisy).blocks)) == 1 and all(isinstance(b, int) for b in rounded(noisy).blocks)
        assert stage_layer_counts(_cfg(8, "measured"), 3, rounded(noisy)) == [2, 3, 3]


def _measured_pipeline(rank: int, overrides: list[str]):
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)
    ref_loss, ref_grads, _ = _reference(model, x, y)
    dims = parallel_dims_from_config(cfg, 2)
    mesh = dims.build_mesh("cpu")
    pm = parallelize(model, dims, cfg, torch.device("cpu"), mesh)
    loss = pipeline_step(pm.schedule, pm.stage_ids, pm.n_stages, pm.pp_group, x, y)
    if pm.tied_sync is not None:
        pm.tied_sync.sync_tied_embedding_grads()
    _check_grads(pm.parts, ref_grads, f"rank {rank}")
    # every rank agreed on the same (rounded) times
    costs = torch.tensor([pm.stage_costs.first, *pm.stage_costs.blocks, pm.stage_costs.last], dtype=torch.int64)
    theirs = costs.clone()
    dist.broadcast(theirs, src=0)
    assert torch.equal(costs, theirs)
    return pm.layer_counts, loss, ref_loss


def test_measured_split_of_uneven_blocks_runs_and_matches_the_single_device():
    overrides = [
        'model.family="uneven"',
        "model.d_model=32",
        "model.n_layers=6",
        "model.n_heads=4",
        "model.vocab_size=64",
        "model.max_seq_len=16",
        "model.wide_blocks=[0, 1]",
        "model.wide_factor=24",
        "data.seq_len=16",
        "train.micro_batch=4",
        "train.global_batch=4",
        "parallel.pp=2",
        "parallel.pp_microbatches=2",
        'parallel.pp_split="measured"',
    ]
    results = run_distributed(_measured_pipeline, 2, overrides)
    counts, loss, ref_loss = results[0]
    assert all(r[0] == counts for r in results)
    # blocks 0 and 1 cost many times the others: the first stage takes fewer blocks than the
    # count split's [3, 3] (which their measured times would make the slower stage)
    assert counts[0] < counts[1], counts
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
