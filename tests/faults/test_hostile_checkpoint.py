"""A checkpoint whose non-tensor entry carries a pickle that would run code (item 13): resuming
from it is refused by name, and the code never runs. The hostile checkpoint is made the way an
attacker would: a real training run whose RNG state object pickles into a call (`open(MARKER,
"w")`), with an honest manifest (the manifest proves integrity, not trust)."""

from __future__ import annotations

import pytest
import torch

from faults.conftest import tiny_overrides
from meshlm.config import load_config
from meshlm.train.checkpoint import CheckpointError
from meshlm.train.checkpoint_manifest import step_dir, verify_checkpoint
from meshlm.train.trainer import train


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_code_in_it_is_refused_without_running_it(fault_data, tmp_path, monkeypatch):
    marker = tmp_path / "the-payload-ran"
    cfg = load_config(None, tiny_overrides(fault_data, "train.steps=2", "train.checkpoint_every=2"))
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch, "get_rng_state", lambda: _Payload(marker))
        train(cfg, run, log=lambda *a, **k: None)
    assert not marker.exists()
    verify_checkpoint(step_dir(run, 2))  # intact: the manifest matches what the attacker wrote

    with pytest.raises(CheckpointError) as refused:
        train(cfg, tmp_path / "victim", log=lambda *a, **k: None, resume=str(step_dir(run, 2)))
    message = str(refused.value)
    assert "entry 'rng/0'" in message and "would run code" in message and "refused without running it" in message
    assert str(step_dir(run, 2)) in message
    assert not marker.exists(), "the payload ran"
