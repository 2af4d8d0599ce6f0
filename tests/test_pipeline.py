"""Pipeline parallelism: the split, the placement, and parity with the single-device model.

Parity: every rank builds the full model with the same seed and computes the single-device
reference (mean cross-entropy over 8 sequences of 16 tokens, backward); the pipeline runs the
same batch in micro-batches and each rank compares its stages' gradients with the reference
(float32; atol 1e-5 because micro-batches sum in another order), the loss to rel 1e-6.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.nn.parallel import DistributedDataParallel

from meshlm.config import Config, ConfigError
from meshlm.distributed.dims import ParallelDims
from meshlm.distributed.spawn import run_distributed
from meshlm.model.loss import lm_loss
from meshlm.model.registry import build_model, family_spec
from meshlm.model.transformer.config import TransformerConfig
from meshlm.parallel.pipeline import (
    TiedEmbeddingSync,
    build_schedule,
    pipeline_forward_eval,
    pipeline_step,
    plot_pipeline_timeline,
    record_schedule_timeline,
)
from meshlm.parallel.pipeline_split import (
    build_stage_module,
    stage_ids_for_rank,
    stage_layer_counts,
    stage_pp_rank,
)

SCHEDULES_PP2 = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-zero-bubble", 2), ("zbv", 2)]


def _cfg(arch: str, n_layers: int, vocab: int = 64, d: int = 32) -> Config:
    cfg = Config()
    # llama with grouped-query attention (4 heads, 2 kv heads), untied; gpt2 ties its embeddings.
    cfg.model = TransformerConfig(
        arch=arch,
        d_model=d,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2 if arch == "llama" else 0,
        vocab_size=vocab,
        max_seq_len=16,
    )
    return cfg


def _batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, 16), generator=g), torch.randint(0, 64, (n, 16), generator=g)


def _reference(model, x, y):
    loss = lm_loss(model(x), y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if model.cfg.tied:  # one shared matrix on a single device; the last stage's copy must carry the same gradient
        grads["output.weight"] = grads["tok_embeddings.weight"]
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, norm


def _check_grads(modules, ref: dict, label: str) -> set[str]:
    names = set()
    for module in modules:
        module = getattr(module, "module", module)  # DDP
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{label}: {name} has no gradient"
            torch.testing.assert_close(p.grad, ref[name], atol=1e-5, rtol=0, msg=lambda m: f"{label}: {name}: {m}")
            names.add(name)
    return names


def _grad_norm(modules, tied: TiedEmbeddingSync, pp_group) -> float:
    """Global gradient norm over the pipeline, each tied copy weighted by 1 / tied_copies."""
    sq = torch.zeros(())
    for module in modules:
        for name, p in module.named_parameters():
            sq += p.grad.pow(2).sum() / tied.tied_copies(name)
    dist.all_reduce(sq, group=pp_group)
    return sq.sqrt().item()


def _parity_case(pp_rank, pp, pp_group, dims, arch, schedule, v, n_layers, n_micro, expected_counts=None):
    label = f"{arch} {schedule} pp{pp} v{v} rank{pp_rank}"
    cfg = _cfg(arch, n_layers)
    x, y = _batch()
    model = build_model(cfg.model, seed=0)
    ref_loss, ref_grads, ref_norm = _reference(model, x, y)
    n_stages = pp * v
    counts = stage_layer_counts(cfg, n_stages)
    if expected_counts is not None:
        assert counts == expected_counts, f"{label}: auto split {counts}"
    ids = stage_ids_for_rank(pp_rank, pp, schedule, v)
    modules = [build_stage_module(model, s, n_stages, counts) for s in ids]
    tied = TiedEmbeddingSync(modules, ids, n_stages, schedule, dims)
    sched = build_schedule(modules, ids, n_stages, pp_group, "cpu", n_micro, schedule, lm_loss)
    names = set()
    for step in range(2):  # a second step after an evaluation: the schedule keeps working
        loss = pipeline_step(sched, ids, n_stages, pp_group, x, y)
        tied.sync_tied_embedding_grads()
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), f"{label} step {step}: loss {loss} vs {ref_loss}"
        names = _check_grads(modules, ref_grads, f"{label} step {step}")
        norm = _grad_norm(modules, tied, pp_group)
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"{label}: grad norm {norm} vs {ref_norm}"
        eval_loss = pipeline_forward_eval(sched, ids, n_stages, pp_group, x, y)
        assert abs(eval_loss - ref_loss) <= 1e-6 * abs(ref_loss), f"{label}: eval loss {eval_loss} vs {ref_loss}"
        for module in modules:
            module.zero_grad(set_to_none=True)
    expected = set(ref_grads)
    return label, sorted(names), sorted(expected), tied.tied_copies("output.weight")


def _assert_all_parameters_covered(results):
    by_case: dict[str, tuple[set, set]] = {}
    for rank_results in results:
        for label, names, expected, copies in rank_results:
            case = label.rsplit(" rank", 1)[0]
            seen, exp = by_case.setdefault(case, (set(), set(expected)))
            assert not seen & set(names), f"{case}: parameters on two ranks: {seen & set(names)}"
            seen |= set(names)
            assert copies == (2 if case.startswith("gpt2") else 1), case
    for case, (seen, exp) in by_case.items():
        assert seen == exp, f"{case}: missing {exp - seen}, unexpected {seen - exp}"


# ----------------------------------------------------------------------------- split and placement


def test_stage_layer_counts_explicit_list():
    cfg = _cfg("llama", 6)
    cfg.parallel.pp_split = [1, 3, 2]
    assert stage_layer_counts(cfg, 3) == [1, 3, 2]
    for bad, n_stages in (([1, 3, 2], 2), ([1, 3, 1], 3), ([0, 4, 2], 3)):
        cfg.parallel.pp_split = bad
        with pytest.raises(ConfigError, match="pp_split"):
            stage_layer_counts(cfg, n_stages)


def test_stage_layer_counts_auto_balances_embedding_and_output():
    # Tiny vocabulary: the output layer costs a sixth of a block, yet a 2-layer last stage would be the
    # most expensive, and ties give the first stage (the one holding the most activations in 1F1B) fewer.
    assert stage_layer_counts(_cfg("llama", 6), 4) == [1, 2, 2, 1]
    assert stage_layer_counts(_cfg("llama", 8), 4) == [2, 2, 2, 2]
    # Large vocabulary: the output projection (vocab x d = 5.5 blocks for gpt2-124m) leaves the last stage one layer.
    gpt2 = Config()
    gpt2.model = TransformerConfig(
        arch="gpt2", d_model=768, n_layers=12, n_heads=12, vocab_size=50257, max_seq_len=1024
    )
    assert stage_layer_counts(gpt2, 4) == [3, 4, 4, 1]
    assert stage_layer_counts(gpt2, 2) == [9, 3]
    with pytest.raises(ConfigError, match="n_layers"):
        stage_layer_counts(_cfg("llama", 3), 4)


@pytest.mark.parametrize(
    "vocab,n_layers,n_stages", [(64, 7, 3), (4096, 7, 3), (1024, 8, 4), (16384, 6, 4), (256, 5, 5)]
)
def test_stage_layer_counts_auto_is_optimal(vocab, n_layers, n_stages):
    """Brute force over every split: the smallest maximum stage cost, then the smallest sum of squares."""
    cfg = _cfg("llama", n_layers, vocab=vocab)
    costs = family_spec(cfg).stage_costs(cfg.model)
    embedding, block, output = costs.first, costs.blocks[0], costs.last

    def costs(split):
        c = [k * block for k in split]
        c[0] += embedding
        c[-1] += output
        return c

    splits = [s for s in itertools.product(range(1, n_layers + 1), repeat=n_stages) if sum(s) == n_layers]
    best_max = min(max(costs(s)) for s in splits)
    best_sq = min(sum(c * c for c in costs(s)) for s in splits if max(costs(s)) == best_max)
    got = stage_layer_counts(cfg, n_stages)
    assert sum(got) == n_layers and min(got) >= 1
    assert max(costs(got)) == best_max and sum(c * c for c in costs(got)) == best_sq, (got, best_max)


def test_stage_placement_matches_torch_schedules():
    assert stage_ids_for_rank(1, 4, "1f1b", 1) == [1]
    assert [stage_ids_for_rank(r, 2, "interleaved-1f1b", 2) for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids_for_rank(r, 2, "zbv", 2) for r in range(2)] == [[0, 3], [1, 2]]
    for schedule, pp, v, style in [
        ("gpipe", 4, 1, "loop"),
        ("interleaved-1f1b", 4, 3, "loop"),
        ("interleaved-zero-bubble", 2, 4, "loop"),
        ("zbv", 4, 2, "v"),
    ]:
        torch_map = generate_stage_to_rank_mapping(pp, pp * v, style=style)  # what torch's schedules assume
        for r in range(pp):
            ids = stage_ids_for_rank(r, pp, schedule, v)
            assert ids == sorted(s for s, owner in torch_map.items() if owner == r), (schedule, r, ids)
            assert all(stage_pp_rank(s, pp, schedule, v) == r for s in ids)
    with pytest.raises(ValueError, match="exactly 2"):
        stage_ids_for_rank(0, 2, "zbv", 3)
    with pytest.raises(ValueError, match="one stage"):
        stage_ids_for_rank(0, 2, "1f1b", 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_stage_module_prunes_and_chains_to_the_full_model(arch):
    cfg = _cfg(arch, 4)
    model = build_model(cfg.model, seed=0)
    first, last = (build_stage_module(model, s, 2, [2, 2]) for s in (0, 1))
    assert list(first.layers.keys()) == ["0", "1"] and list(last.layers.keys()) == ["2", "3"]
    assert first.norm is None and first.output is None
    assert last.tok_embeddings is None and last.pos_embeddings is None and last.norm is not None
    params = dict(model.named_parameters())
    for stage in (first, last):
        for name, p in stage.named_parameters():
            key = "tok_embeddings.weight" if name == "output.weight" and cfg.model.tied else name
            assert torch.equal(p, params[key]) and p is not params[key], name
    if cfg.model.tied:  # the last stage owns a copy; the original stays tied
        assert last.output.weight is not model.tok_embeddings.weight
        assert model.output.weight is model.tok_embeddings.weight
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(last(first(x)), model(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- parity over processes


def _pp2_world(rank):
    dims = ParallelDims(world_size=2, dp_replicate=1, dp_shard=1, tp=1, pp=2)
    return [
        _parity_case(rank, 2, None, dims, arch, schedule, v, n_layers=4, n_micro=4)
        for arch in ("llama", "gpt2")
        for schedule, v in SCHEDULES_PP2
    ]


def test_pipeline_pp2_matches_single_device_all_schedules():
    _assert_all_parameters_covered(run_distributed(_pp2_world, 2))


def _pp4_world(rank):
    dims = ParallelDims(world_size=4, dp_replicate=1, dp_shard=1, tp=1, pp=4)
    return [
        _parity_case(rank, 4, None, dims, arch, schedule, 1, n_layers=6, n_micro=4, expected_counts=[1, 2, 2, 1])
        for arch in ("llama", "gpt2")
        for schedule in ("1f1b", "gpipe")
    ]


def test_pipeline_pp4_uneven_auto_split_matches_single_device():
    _assert_all_parameters_covered(run_distributed(_pp4_world, 4))


def _pp2_dp2_world(rank):
    """pp 2 x dp 2, gpt2 (tied), each data-parallel rank with its own half of the batch.
    Without DDP, the tied sync must pair each rank with the pp peer of the *same* dp rank: the
    gradients then match a reference on that half. With DDP-wrapped stages (as the trainer
    builds them; small buckets so that several are reduced), they match the full-batch
    reference, for two steps (torch's own DDP path breaks on the second) and every schedule."""
    dims = ParallelDims(world_size=4, dp_replicate=1, dp_shard=2, tp=1, pp=2)
    mesh = dims.build_mesh("cpu")
    pp_group, dp_group = mesh.group("pp"), mesh.group("dp")
    coords = dims.coordinates(rank)
    pp_rank, dp_rank = coords["pp"], coords["dp"]
    cfg = _cfg("gpt2", 4)
    x, y = _batch()
    half = slice(4 * dp_rank, 4 * dp_rank + 4)
    model = build_model(cfg.model, seed=0)
    half_loss, half_grads, _ = _reference(model, x[half], y[half])
    full_loss, full_grads, _ = _reference(model, x, y)
    out = []
    cases = [("1f1b", False)] + [(schedule, True) for schedule, _ in SCHEDULES_PP2]
    for schedule, wrap in cases:
        label = f"pp2 dp2 {schedule} ddp={wrap} rank{rank}"
        v = dict(SCHEDULES_PP2)[schedule]
        n_stages = 2 * v
        ids = stage_ids_for_rank(pp_rank, 2, schedule, v)
        modules = [build_stage_module(model, s, n_stages, stage_layer_counts(cfg, n_stages)) for s in ids]
        tied = TiedEmbeddingSync(modules, ids, n_stages, schedule, dims)
        if wrap:
            modules = [
                DistributedDataParallel(m, process_group=dp_group, bucket_cap_mb=0.01, gradient_as_bucket_view=True)
                for m in modules
            ]
        sched = build_schedule(modules, ids, n_stages, pp_group, "cpu", 2, schedule, lm_loss)
        for step in range(2 if wrap else 1):
            loss = pipeline_step(sched, ids, n_stages, pp_group, x[half], y[half])
            tied.sync_tied_embedding_grads()
            assert abs(loss - half_loss) <= 1e-6 * half_loss, f"{label}: loss {loss} vs {half_loss}"
            names = _check_grads(modules, full_grads if wrap else half_grads, f"{label} step {step}")
            for module in modules:
                module.zero_grad(set_to_none=True)
        eval_loss = pipeline_forward_eval(sched, ids, n_stages, pp_group, x[half], y[half])  # pp group ranks != global
        assert abs(eval_loss - half_loss) <= 1e-6 * half_loss, f"{label}: eval loss {eval_loss} vs {half_loss}"
        out.append((label, sorted(names)))
    return out


def test_pipeline_with_data_parallel_pairs_tied_copies_per_dp_rank():
    results = run_distributed(_pp2_dp2_world, 4)
    for rank_results in results:
        assert len(rank_results) == 1 + len(SCHEDULES_PP2)
    # pp rank 0 (global ranks 0, 1) holds the embedding, pp rank 1 (2, 3) the output copy
    assert "tok_embeddings.weight" in results[1][0][1] and "output.weight" in results[3][0][1]


# ----------------------------------------------------------------------------- timeline


def _timeline_world(rank):
    out = {}
    for schedule, v in (("1f1b", 1), ("zbv", 2)):
        cfg = _cfg("llama", 4)
        x, y = _batch()
        model = build_model(cfg.model, seed=0)
        n_stages = 2 * v
        ids = stage_ids_for_rank(rank, 2, schedule, v)
        modules = [build_stage_module(model, s, n_stages, stage_layer_counts(cfg, n_stages)) for s in ids]
        sched = build_schedule(modules, ids, n_stages, None, "cpu", 4, schedule, lm_loss)
        pipeline_step(sched, ids, n_stages, None, x, y)  # the first step also infers shapes
        with record_schedule_timeline(sched) as timeline:
            pipeline_step(sched, ids, n_stages, None, x, y)
        pipeline_step(sched, ids, n_stages, None, x, y)  # unwrapped again: records nothing more
        assert all("forward_one_chunk" not in vars(stage) for stage in sched.stages)
        out[schedule] = timeline.gather(None)
    return out


def test_schedule_timeline_records_every_action_and_plots(tmp_path):
    result = run_distributed(_timeline_world, 2)[0]
    for schedule, backward_kinds in (("1f1b", {"B"}), ("zbv", {"I", "W"})):
        events_per_rank = result[schedule]
        assert len(events_per_rank) == 2
        for rank, events in enumerate(events_per_rank):
            stages = stage_ids_for_rank(rank, 2, schedule, 2 if schedule == "zbv" else 1)
            kinds = {e.kind for e in events}
            assert kinds == {"F"} | backward_kinds, (schedule, kinds)
            for stage, kind in itertools.product(stages, kinds):
                mbs = sorted(e.microbatch for e in events if e.stage == stage and e.kind == kind)
                assert mbs == [0, 1, 2, 3], (schedule, rank, stage, kind, mbs)
            forward_end = {(e.stage, e.microbatch): e.end for e in events if e.kind == "F"}
            for e in events:
                assert e.end >= e.start
                if e.kind != "F":
                    assert e.start >= forward_end[(e.stage, e.microbatch)], (schedule, e)
        path = tmp_path / f"{schedule}.png"
        plot_pipeline_timeline(events_per_rank, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert math.isfinite(result["1f1b"][0][0].start)
