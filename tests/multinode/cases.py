"""The tiny training case of the multi-node tests (the parity config of test_parallel_training.py)
and its single-process reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

from meshlm.artifacts.weights_file import load_weights
from meshlm.config import load_config
from meshlm.train.trainer import train

LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4

BASE = [
    'model.arch="llama"',
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.d_model=64",
    "model.n_layers=4",
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


def quiet(*args, **kwargs):
    pass


def single_process(overrides: list[str], out: Path):
    """(losses, final val loss, weights) of one process trained with `overrides` into `out`."""
    cfg = load_config(None, overrides)
    result = train(cfg, out, log=quiet)
    return result.losses, result.final_val_loss, load_weights(out / "model.safetensors", cfg.model).state_dict()


def assert_same_losses(losses: list[float], reference: list[float], what: str = "across hosts") -> None:
    assert len(losses) == len(reference), f"{len(losses)} steps logged, the reference has {len(reference)}"
    for step, (a, b) in enumerate(zip(losses, reference), start=1):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"step {step}: loss {a} {what} vs one process {b}"


def assert_same_weights(run: Path, overrides: list[str], reference_state) -> None:
    cfg = load_config(None, overrides)
    state = load_weights(run / "model.safetensors", cfg.model).state_dict()
    for name, value in reference_state.items():
        diff = (state[name] - value).abs().max().item()
        assert diff <= PARAM_ATOL, f"{name}: max abs difference {diff}"


def final_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    return records[-1]["val_loss"]
