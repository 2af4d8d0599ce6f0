"""A loss or gradient norm that becomes NaN (item 7): training stops at that step, naming it and
the checkpoint to resume from, without applying the step; train.skip_nonfinite_steps skips up to
N such steps. The NaN is injected from outside: torch's cross-entropy returns NaN at chosen
training steps (tests/drivers/nan_loss_at_steps.py, or monkeypatch in this process)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults.conftest import assert_clean_error, command_env, nan_loss_at, sets, tiny_overrides
from meshlm.artifacts.weights_file import load_weights
from meshlm.config import load_config
from meshlm.train.checkpoint_manifest import list_checkpoints, step_dir
from meshlm.train.metrics import read_metrics
from meshlm.train.trainer import train
from meshlm.utils.errors import RunError

DRIVER = Path(__file__).resolve().parents[1] / "drivers" / "nan_loss_at_steps.py"


def test_a_nan_step_stops_training_and_names_the_checkpoint(fault_data, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(fault_data, "train.steps=6", "train.checkpoint_every=2")
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "3", "train", *sets(overrides), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env=command_env(),
    )
    message = assert_clean_error(proc, 1, "training stopped at step 4", "the loss is nan", "--resume auto")
    assert f"{step_dir(run, 2)} (step 2)" in message and "train.skip_nonfinite_steps" in message
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["step"] == 4 and records[-1]["skipped"] is True
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not (run / "model.safetensors").exists()


def test_skip_nonfinite_steps_skips_then_stops(fault_data, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(fault_data, "train.steps=6", "train.skip_nonfinite_steps=2"))
    nan_loss_at(monkeypatch, {2, 4})
    result = train(cfg, tmp_path / "skips", log=lambda *a, **k: None)
    records = read_metrics(tmp_path / "skips" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    assert math.isfinite(result.final_loss)
    for name, value in load_weights(tmp_path / "skips" / "model.safetensors", cfg.model).state_dict().items():
        assert torch.isfinite(value).all(), name

    nan_loss_at(monkeypatch, {1, 2, 3})
    with pytest.raises(RunError, match=r"training stopped at step 4 after 2 skipped non-finite step\(s\)"):
        train(cfg, tmp_path / "stops", log=lambda *a, **k: None)
