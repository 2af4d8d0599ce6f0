"""The full-pass training methods (maxent by L-BFGS, hmm by EM) under the same faults as a
gradient step: a non-finite objective skips the step (no L-BFGS step, no M-step) and stops
training after train.skip_nonfinite_steps such steps, naming the step and the checkpoint; a
checkpoint (L-BFGS history included) that does not fit on the disk stops training with "disk
full", keeps the previous one and resumes from it.

The NaN is injected from outside: torch's cross-entropy (L-BFGS) or the hmm's E-step counts (EM)
return NaN at chosen steps; the full disk is a real tmpfs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import meshlm.train.full_batch as full_batch
from faults.conftest import remount
from meshlm.artifacts.weights_file import load_weights
from meshlm.config import load_config
from meshlm.train.checkpoint_manifest import list_checkpoints, step_dir, verify_checkpoint
from meshlm.train.metrics import read_metrics
from meshlm.train.trainer import train
from meshlm.utils.errors import DiskFullError, RunError

BASE = [
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=60000",
    "train.micro_batch=32",
    "train.global_batch=128",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
]
LBFGS = ['model.family="maxent"', "model.order=3", "model.hash_rows=64", 'train.optimizer="lbfgs"']
EM = ['model.family="hmm"', "model.n_states=16", 'train.optimizer="em"']


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def classical_data(prepare_corpus):
    return prepare_corpus(BASE)


def _config(cache, method, *extra):
    return load_config(None, [*BASE, *method, f'data.cache_dir="{cache}"', *extra])


def _track_steps(monkeypatch, runner_class) -> dict:
    current = {"step": -1}
    train_step = runner_class.train_step

    def tracking(self, step):
        current["step"] = step
        return train_step(self, step)

    monkeypatch.setattr(runner_class, "train_step", tracking)
    return current


def _stopped_after_one_skip(run, message: str, setting: str) -> None:
    """Steps 2 and 3 not finite, skip_nonfinite_steps=1: step 2 skipped (its checkpoint holds
    step 1's weights, unchanged), step 3 stops without a checkpoint."""
    assert "training stopped at step 3 after 1 skipped non-finite step(s)" in message, message
    assert f"{step_dir(run, 2)} (step 2)" in message and "--resume auto" in message and setting in message
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    assert not (run / "model.safetensors").exists()


def test_lbfgs_nonfinite_objective_skips_then_stops(classical_data, tmp_path, monkeypatch):
    """NaN at steps 2 and 3 with skip_nonfinite_steps=1: step 2 is skipped, step 3 stops."""
    current = _track_steps(monkeypatch, full_batch.LBFGSStepRunner)
    loss = F.cross_entropy

    def poisoned(*args, **kwargs):
        value = loss(*args, **kwargs)
        return value * float("nan") if torch.is_grad_enabled() and current["step"] >= 1 else value

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    cfg = _config(classical_data, LBFGS, "train.steps=4", "train.checkpoint_every=1", "train.skip_nonfinite_steps=1")
    run = tmp_path / "lbfgs"
    with pytest.raises(RunError) as raised:
        train(cfg, run, log=quiet)
    _stopped_after_one_skip(run, str(raised.value), "train.lbfgs_l2")
    # The checkpoint it names holds the last good state, L-BFGS history included: the steps
    # after it are finite and keep lowering the objective.
    monkeypatch.setattr(F, "cross_entropy", loss)
    result = train(cfg, run, log=quiet, resume="auto")
    before = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("step") == 1 and "loss" in r]
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[0] < before[0] and result.losses[1] < result.losses[0]
    for name, value in load_weights(run / "model.safetensors", cfg.model).state_dict().items():
        assert torch.isfinite(value).all(), name


def test_em_nonfinite_likelihood_skips_the_m_step_then_stops(classical_data, tmp_path, monkeypatch):
    current = _track_steps(monkeypatch, full_batch.EMStepRunner)
    real_spec = full_batch.family_spec

    def poisoned_spec(cfg):
        spec = real_spec(cfg)
        counts = spec.em.expected_counts

        def expected_counts(model, x):
            out = counts(model, x)
            if current["step"] >= 1:
                out["log_likelihood"] = out["log_likelihood"] * float("nan")
            return out

        return dataclasses.replace(spec, em=dataclasses.replace(spec.em, expected_counts=expected_counts))

    monkeypatch.setattr(full_batch, "family_spec", poisoned_spec)
    cfg = _config(classical_data, EM, "train.steps=4", "train.checkpoint_every=1", "train.skip_nonfinite_steps=1")
    run = tmp_path / "em"
    with pytest.raises(RunError) as raised:
        train(cfg, run, log=quiet)
    _stopped_after_one_skip(run, str(raised.value), "train.em_smoothing")


def test_lbfgs_checkpoint_on_a_full_disk_keeps_the_previous_one_and_resumes(classical_data, small_disk):
    """A tmpfs that holds the first L-BFGS checkpoint (~0.5 MiB) but not the second (its history
    makes it larger): training stops at the save of step 2, before or while writing it, step 1
    stays intact, and once the disk grows --resume auto finishes the run."""
    cfg = _config(classical_data, LBFGS, "train.steps=3", "train.checkpoint_every=1")
    disk = small_disk(900 * 1024)
    run = disk / "run"
    with pytest.raises(DiskFullError) as raised:
        train(cfg, run, log=quiet)
    message = str(raised.value)
    assert f"disk full at {step_dir(run, 2)}: need" in message and "MiB free" in message, message
    assert f"{step_dir(run, 1)} (step 1) is intact" in message and "--resume auto" in message
    assert [s for s, _ in list_checkpoints(run)] == [1]
    verify_checkpoint(step_dir(run, 1))
    assert not list((run / "checkpoints").glob("*.tmp")), "no partial checkpoint is left"

    remount(disk, 16 << 20)
    result = train(cfg, run, log=quiet, resume="auto")
    assert len(result.losses) == 2 and result.losses[-1] < result.losses[0]
    load_weights(run / "model.safetensors", cfg.model)
