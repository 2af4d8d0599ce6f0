"""The planner for every registered family (planned from its spec) and `meshlm plan --serve`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from test_planner import cpu_cache  # noqa: F401  (the fixture: a cpu-local measurement in a temporary cache)

from meshlm.config import ConfigError, load_config
from meshlm.model.registry import family_names, family_spec
from meshlm.model.stats import count_params
from meshlm.model.tp_rules import layout_problem
from meshlm.plan.clusters import make_cluster
from meshlm.plan.family_shapes import has_block_model, inventory, rank_parameters
from meshlm.plan.hardware import GiB
from meshlm.plan.layout import Workload, parse_layout
from meshlm.plan.serve import ServeTargets, plan_serving, state_bytes_per_sequence
from meshlm.plan.shapes import model_key

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "meshlm" / "configs"


def family_config(family: str) -> str:
    """A built-in config of the family: <family>-tiny, else the smallest built-in config of it."""
    if (CONFIGS / f"{family}-tiny.toml").is_file():
        return f"{family}-tiny"
    names = sorted(p.stem for p in CONFIGS.glob("*.toml"))
    found = [n for n in names if load_config(n, []).model.family == family]
    assert found, f"no built-in config of family {family}"
    return min(found, key=lambda n: count_params(load_config(n, []).model))


def _cli(argv: list[str], capsys) -> str:
    from meshlm.plan.commands import add_commands

    parser = argparse.ArgumentParser(prog="meshlm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family", family_names())
def test_every_family_plans_only_layouts_it_runs(family, cpu_cache, capsys):  # noqa: F811
    name = family_config(family)
    argv = ["plan", "--config", name, "--devices-per-node", "2", "--global-batch", "4", "--seq-len", "32"]
    out = json.loads(_cli(argv + ["--top", "50", "--json"], capsys))
    m = load_config(name, []).model
    assert out["model"]["family"] == family
    assert out["model"]["parameters"] == count_params(m)
    cands = out["candidates"]
    assert cands and cands[0]["fits"] and cands[0]["step_time_s"] > 0
    for c in cands:  # never a layout the family refuses
        assert layout_problem(m, c["tp"], c["pp"], c["sequence_parallel"]) is None, c
    spec = family_spec(m)
    if spec.capabilities.pipeline:
        assert all(c["pp"] == 1 for c in cands)
    if spec.capabilities.tensor_parallel:
        assert all(c["tp"] == 1 for c in cands)
    # cpu-local memory is params + grads + AdamW state (16 B per parameter) on the largest rank
    single = [c for c in cands if c["dp"] == 1 and c["tp"] == 1 and c["pp"] == 1]
    if single:
        assert single[0]["memory_gb_per_device"] * GiB == pytest.approx(16 * count_params(m), rel=1e-6)


@pytest.mark.parametrize("family", [f for f in family_names() if family_spec(f).capabilities.pipeline])
def test_refused_layout_in_the_familys_words(family, cpu_cache, capsys):  # noqa: F811
    from meshlm.plan.api import plan

    cfg = load_config(family_config(family), [])
    cluster = make_cluster("cpu-local", None, 2)
    workload = Workload(cfg.model, cfg.train.global_batch, cfg.data.seq_len)
    with pytest.raises(ConfigError) as refused:
        plan(workload, cluster, layout=parse_layout("pp=2", 2))
    assert str(refused.value) == family_spec(family).capabilities.refusal(family, 1, False, 2)


def _tp_shards(rank: int, families: list[str]) -> dict:
    """Parameters this rank holds after meshlm's tensor parallelism splits each family's model."""
    import torch.distributed as dist

    from meshlm.model.registry import build_model
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel

    out = {}
    for family in families:
        model = build_model(load_config(family_config(family), []).model, "cpu", seed=0)
        apply_tensor_parallel(model, dist.group.WORLD)
        out[family] = sum(p.numel() for p in model.parameters())
    return out


def test_parameters_per_rank_equal_meshlms_tensor_parallel_split():
    """The planner's parameters per part and tp rank (read from the meta model and the TP plan)
    against a real two-rank split of every family that has tensor parallelism."""
    from meshlm.distributed.spawn import run_distributed

    families = [f for f in family_names() if not family_spec(f).capabilities.tensor_parallel]
    for family in family_names():
        m = load_config(family_config(family), []).model
        numel, full, _, _ = rank_parameters(model_key(m), 1)
        assert sum(full) == sum(numel) == count_params(m)  # the spec's count: what the trainer logs
        assert sum(inventory(model_key(m), 32, 1).activations) > 0
    shards = run_distributed(_tp_shards, 2, families)
    for family in families:
        m = load_config(family_config(family), []).model
        assert shards[0][family] == shards[1][family]
        assert sum(rank_parameters(model_key(m), 2)[0]) == shards[0][family], family


def test_block_model_is_used_only_where_it_applies():
    assert has_block_model(load_config("tiny-cpu", []).model)
    for family in family_names():
        m = load_config(family_config(family), []).model
        assert has_block_model(m) == (getattr(m, "arch", None) in ("llama", "gpt2"))


# ----------------------------------------------------------------------------- serving


@pytest.mark.parametrize("family", family_names())
def test_serve_plan_every_family(family, cpu_cache, capsys):  # noqa: F811
    name = family_config(family)
    m = load_config(name, []).model
    argv = ["plan", "--serve", "--config", name, "--devices-per-node", "2", "--prompt-len", "32", "--max-batch", "4"]
    out = json.loads(_cli(argv + ["--gen-len", "16", "--json"], capsys))
    assert out["model"]["family"] == family and out["prompt_len"] == 32 and out["gen_len"] == 16
    rows = {r["tp"]: r for r in out["candidates"]}
    assert 1 in rows and rows[1]["replicas"] == 2
    one = rows[1]
    # the state per sequence is the family's own DecodeState, one more sequence of 48 tokens
    spec = family_spec(m)
    with torch.device("meta"):
        model = spec.model_class(m)
    extra = spec.decode_state(model, 3, 48).nbytes() - spec.decode_state(model, 2, 48).nbytes()
    assert one["state_mb_per_sequence"] * 2**20 == pytest.approx(extra)
    assert one["weights_gb_per_device"] * GiB == pytest.approx(4 * count_params(m))
    assert one["batch"] == 4 and one["fits"] and one["meets_targets"]
    assert one["decode_step_ms"] > 0 and one["ttft_ms"] > 0
    assert one["tokens_per_s"] == pytest.approx(2 * 4 / (one["decode_step_ms"] / 1e3))
    for tp in rows:
        assert layout_problem(m, tp=tp) is None
    # an unreachable target is reported as missed, with the reason
    missed = json.loads(_cli(argv + ["--min-tokens-per-s", "1e12", "--json"], capsys))
    assert not any(r["meets_targets"] for r in missed["candidates"])
    assert "tokens/s <" in missed["candidates"][0]["reason"]


def test_serve_kv_cache_and_capacity_on_a_gpu_cluster():
    from meshlm.plan.models import model_preset

    m = model_preset("llama3-70b")
    cluster = make_cluster("dgx-h100", 1, None)
    rows = {r.tp: r for r in plan_serving(m, cluster, ServeTargets(1024, 1024, max_ttft_ms=2000))}
    # KV cache: 2 (k, v) x layers x kv heads x head dim x tokens, bf16, split over tp
    kv = 2 * m.n_layers * m.kv_heads * m.head_dim * 2048 * 2
    assert state_bytes_per_sequence(m, 2048) / 2 == pytest.approx(kv)
    assert rows[8].state_bytes_per_sequence == pytest.approx(kv / 8)
    assert not rows[1].fits  # 140 GB of bf16 weights on one 80 GB GPU
    usable = cluster.device.memory_bytes - cluster.device.reserve_bytes
    for r in rows.values():
        if r.fits:
            assert r.weights_bytes + r.max_batch_fits * r.state_bytes_per_sequence <= usable
            assert r.weights_bytes + (r.max_batch_fits + 1) * r.state_bytes_per_sequence > usable
    assert rows[8].max_batch_fits > rows[4].max_batch_fits
    with pytest.raises(ConfigError, match="exceed model.max_seq_len"):
        plan_serving(m, cluster, ServeTargets(m.max_seq_len, 1))
