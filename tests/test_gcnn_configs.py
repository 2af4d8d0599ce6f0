"""The gated CNN's configs and keys: gcnn-tiny trains (a short run of it), gcnn-large has the
size its comment says, bad keys are ConfigErrors naming the key, and a layout whose degrees
cannot split the model is refused before any worker starts."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from meshlm.config import ConfigError, load_config
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.inference.simple_generate import end_of_run_sample
from meshlm.model.registry import family_spec, meta_model
from meshlm.train.metrics import read_metrics
from meshlm.train.trainer import train

# gcnn-tiny, narrower and shallower, on less data and fewer steps (test_train.py's TINY run)
SHORT = [
    "model.d_model=64",
    "model.n_layers=3",
    "model.channels=64",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=600000",
    "train.micro_batch=8",
    "train.global_batch=16",
    "train.steps=90",
    "train.warmup_steps=5",
    "train.eval_every=30",
    "train.eval_batches=4",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.sample_tokens=8",
    "train.progress=false",
]


def test_gcnn_tiny_trains_with_a_falling_validation_loss(tmp_path):
    cfg = load_config("gcnn-tiny", SHORT + [f'data.cache_dir="{tmp_path / "cache"}"'])
    assert (cfg.model.family, cfg.model.kernel_size, cfg.model.tied) == ("gcnn", 5, True)
    result = train(cfg, tmp_path / "run", log=lambda *a, **k: None, sampler=end_of_run_sample)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r["loss"] for r in records if "loss" in r]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    first, last = sum(steps[:3]) / 3, sum(steps[-3:]) / 3
    assert first > math.log(cfg.model.vocab_size) - 0.5
    assert last < first - 1.0, (first, last)
    assert evals[0] > evals[1] > evals[2] and evals[-1] < first - 1.0, evals
    assert result.sample.startswith(cfg.train.sample_prompt)


def test_gpu_sized_config_is_the_size_it_says():
    cfg = load_config("gcnn-large")
    spec = family_spec(cfg)
    n = spec.count_params(cfg.model)
    assert 390e6 < n < 420e6  # "about 400M parameters"
    assert n == sum(p.numel() for p in meta_model(cfg.model).parameters())
    assert spec.tp_problem(cfg.model, 8) is None and cfg.model.receptive_field == 49


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.kernel_size=0"], "'model.kernel_size' must be at least 1"),
        (["model.bottleneck=-1"], "'model.bottleneck' must be zero or positive"),
        (["model.n_heads=4"], r"unknown key 'model.n_heads'.*Valid keys in \[model\] for model.family 'gcnn'"),
    ],
)
def test_bad_keys_are_config_errors_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("gcnn-tiny", overrides)


def test_transformer_keys_carry_over_when_switching_family():
    """Keys both families have keep their values (d_model, n_layers, vocab_size, ...)."""
    cfg = load_config(None, ["model.d_model=96", "model.n_layers=3", 'model.family="gcnn"'])
    assert (cfg.model.family, cfg.model.d_model, cfg.model.n_layers) == ("gcnn", 96, 3)


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        # channels default to d_model (128): tp=3 cannot split them
        (
            3,
            ["parallel.tp=3", "model.channels=0"],
            r"model.channels \(128, the default: .*model.d_model\)\) is not divisible by 3",
        ),
        # explicit channels
        (
            4,
            ["parallel.tp=4", "model.channels=90"],
            r"model.channels \(90\) is not divisible by 4. Use tp among 1, 2, 3",
        ),
        # the bottleneck width is the default channel count of bottleneck blocks
        (
            2,
            ["parallel.tp=2", "model.channels=0", "model.bottleneck=33"],
            r"model.channels \(33, the default: .*model.bottleneck\)\)",
        ),
        (2, ["parallel.pp=2", "model.n_layers=1"], r"model.n_layers \(1\) is less than the number of pipeline stages"),
    ],
)
def test_layouts_that_cannot_split_the_model_are_refused(world, overrides, expected):
    cfg = load_config("gcnn-tiny", overrides)
    with pytest.raises(ConfigError, match=expected):
        parallel_dims_from_config(cfg, world)


def test_cli_refuses_an_indivisible_tp_before_any_worker_starts(tmp_path):
    sets = [x for o in ["parallel.tp=4", "model.channels=90"] for x in ("--set", o)]
    cmd = [sys.executable, "-m", "meshlm", "train", "--config", "gcnn-tiny", *sets, "--nproc", "4"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "model.channels (90) is not divisible by 4" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "torch.distributed.elastic" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_activation_checkpointing_and_bf16_autocast(tmp_path):
    """Recomputing each block's activations changes nothing; bf16 autocast (the convolutions
    included) trains close to float32 without being it."""
    base = SHORT + [f'data.cache_dir="{tmp_path / "cache"}"', "train.steps=4", "train.eval_every=0"]
    runs = {}
    for name, extra in {
        "plain": [],
        "ac": ["train.activation_checkpointing=true"],
        "bf16": ["train.dtype=bfloat16"],
    }.items():
        train(load_config("gcnn-tiny", base + extra), tmp_path / name, log=lambda *a, **k: None)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert runs["ac"] == pytest.approx(runs["plain"], rel=1e-6)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2)
    assert runs["bf16"] != runs["plain"]
