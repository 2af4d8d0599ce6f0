"""Exactness of every layout against the single process (float32, gloo, forked ranks).

For each layout: 5 AdamW steps (with clipping and warm-up) from the same seed and the
same global batch as one process. Every step's loss within 1e-5 relative, every
parameter after the last step within 1e-4 absolute after gathering.
"""

from __future__ import annotations

import math

import pytest
from family_cases import FAMILY_CASES

from meshlm.artifacts.weights_file import load_weights
from meshlm.config import ConfigError, load_config
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.distributed.spawn import run_distributed
from meshlm.train.trainer import train

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4

VARIANTS = FAMILY_CASES

BASE = [
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=300000",
    "train.steps=5",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",
    "train.eval_every=5",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "train.progress=false",
]

# (case id, world size, overrides)
LAYOUTS = [
    ("dp2-zero0", 2, ["parallel.dp=2", "parallel.zero=0"]),
    ("dp2-zero1", 2, ["parallel.dp=2", "parallel.zero=1"]),
    ("dp2-zero2", 2, ["parallel.dp=2", "parallel.zero=2"]),
    ("dp2-zero3", 2, ["parallel.dp=2", "parallel.zero=3"]),
    ("hsdp-2x2", 4, ["parallel.zero=3", "parallel.dp_replicate=2"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("tp4-sp", 4, ["parallel.tp=4", "parallel.sequence_parallel=true"]),
    ("pp2-gpipe", 2, ["parallel.pp=2", 'parallel.pp_schedule="gpipe"']),
    ("pp2-1f1b", 2, ["parallel.pp=2", 'parallel.pp_schedule="1f1b"']),
    (
        "pp2-interleaved-1f1b",
        2,
        ["parallel.pp=2", 'parallel.pp_schedule="interleaved-1f1b"', "parallel.pp_virtual_stages=2"],
    ),
    (
        "pp2-interleaved-zb",
        2,
        ["parallel.pp=2", 'parallel.pp_schedule="interleaved-zero-bubble"', "parallel.pp_virtual_stages=2"],
    ),
    ("pp2-zbv", 2, ["parallel.pp=2", 'parallel.pp_schedule="zbv"', "parallel.pp_virtual_stages=2"]),
    ("pp4-uneven-6-layers", 4, ["parallel.pp=4", "model.n_layers=6"]),
    ("dp2-tp2", 4, ["parallel.dp=2", "parallel.tp=2"]),
    ("pp2-tp2", 4, ["parallel.pp=2", "parallel.tp=2"]),
    ("pp2-dp2-zero3", 4, ["parallel.pp=2", "parallel.dp=2", "parallel.zero=3"]),
    ("dp2-tp2-pp2", 8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"]),
]


@pytest.fixture(scope="module")
def data_cache(prepare_corpus):
    return prepare_corpus(BASE)


def _config(variant: str, cache, extra: list[str]):
    return load_config(None, BASE + VARIANTS[variant] + [f'data.cache_dir="{cache}"'] + extra)


def _train_rank(rank: int, cfg, out):
    result = train(cfg, out, log=lambda *a, **k: None)
    return result.losses, result.final_val_loss


_references: dict = {}


def reference(variant: str, cache, tmp_path_factory, extra=()):
    key = (variant, tuple(extra))
    if key not in _references:
        out = tmp_path_factory.mktemp(f"ref-{variant}")
        cfg = _config(variant, cache, list(extra))
        result = train(cfg, out, log=lambda *a, **k: None)
        _references[key] = (
            result.losses,
            result.final_val_loss,
            load_weights(out / "model.safetensors", cfg.model).state_dict(),
        )
    return _references[key]


def assert_same_training(ref, got_losses, got_val, got_state):
    ref_losses, ref_val, ref_state = ref
    assert len(got_losses) == len(ref_losses)
    for step, (a, b) in enumerate(zip(got_losses, ref_losses), start=1):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"step {step}: loss {a} vs single process {b}"
    assert math.isclose(got_val, ref_val, rel_tol=LOSS_RTOL), f"val loss {got_val} vs {ref_val}"
    assert set(got_state) == set(ref_state)
    for name, value in ref_state.items():
        diff = (got_state[name] - value).abs().max().item()
        assert diff <= PARAM_ATOL, f"{name}: max abs difference {diff} after 5 steps"


def _runs(variant: str, world: int, overrides: list[str]) -> bool | None:
    """Whether the variant's family can run this layout (else the refusal is tested below);
    None when the layout's overrides set model keys the family does not have (model.n_layers)."""
    try:
        cfg = load_config(None, BASE + VARIANTS[variant] + overrides)
    except ConfigError as e:
        if "unknown key 'model." in str(e):
            return None
        raise
    try:
        parallel_dims_from_config(cfg, world)
    except ConfigError as e:
        if "model.family" in str(e):
            return False
        raise
    return True


MATRIX = [
    pytest.param(case, world, overrides, variant, id=f"{variant}-{case}")
    for variant in VARIANTS
    for case, world, overrides in LAYOUTS
    if _runs(variant, world, overrides) is True
]
REFUSED = [
    pytest.param(world, overrides, variant, id=f"{variant}-{case}")
    for variant in VARIANTS
    for case, world, overrides in LAYOUTS
    if _runs(variant, world, overrides) is False
]


@pytest.mark.parametrize("case, world, overrides, variant", MATRIX)
def test_layout_matches_single_process(case, world, overrides, variant, data_cache, tmp_path, tmp_path_factory):
    layer_override = [o for o in overrides if o.startswith("model.n_layers")]
    ref = reference(variant, data_cache, tmp_path_factory, layer_override)
    cfg = _config(variant, data_cache, overrides)
    results = run_distributed(_train_rank, world, cfg, tmp_path / "run")
    losses, val = results[0]
    for rank_losses, rank_val in results[1:]:
        assert rank_losses == losses and rank_val == val, "every rank must log the same loss"
    state = load_weights(tmp_path / "run" / "model.safetensors", cfg.model).state_dict()
    assert_same_training(ref, losses, val, state)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_accumulation_equals_one_large_batch(variant, data_cache, tmp_path, tmp_path_factory):
    """4 micro-batches of 2 accumulate to exactly the step of one batch of 8."""
    ref = reference(variant, data_cache, tmp_path_factory, ["train.micro_batch=8"])
    cfg = _config(variant, data_cache, ["train.micro_batch=2"])
    result = train(cfg, tmp_path / "acc", log=lambda *a, **k: None)
    state = load_weights(tmp_path / "acc" / "model.safetensors", cfg.model).state_dict()
    assert_same_training(ref, result.losses, result.final_val_loss, state)


@pytest.mark.skipif(not REFUSED, reason="every registered family runs every layout of the matrix")
@pytest.mark.parametrize("world, overrides, variant", REFUSED)
def test_layouts_a_family_cannot_run_are_refused_before_launch(world, overrides, variant):
    family = load_config(None, BASE + VARIANTS[variant]).model.family
    with pytest.raises(ConfigError, match=f"model.family '{family}' cannot run .* It can run"):
        parallel_dims_from_config(load_config(None, BASE + VARIANTS[variant] + overrides), world)
