"""Resuming fine-tuning: a run continued from one of its checkpoints (under the same layout, or
dp2 from a one-process checkpoint) trains the same steps to the same model as the run that was
never stopped: the training state, the best model so far and the early-stopping count all come
back. And the refusals: a fresh run into a directory holding checkpoints, a checkpoint that is
not a fine-tuning one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from task_fixtures import classify_setup, meshlm

from meshlm.config import ConfigError
from meshlm.tasks.finetune import finetune, finetune_config
from meshlm.train.checkpoint_manifest import list_checkpoints

SETS = [
    "task.epochs=0",
    "train.steps=8",
    "train.eval_every=2",
    "train.keep_checkpoints=10",
    "task.patience=0",
    "task.ngram_buckets=512",
    "task.dropout=0",  # dropout draws differ between layouts (the parity tests run without it too)
    "train.progress=false",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run never stopped: checkpoints after the validations of steps 2, 4 and 6."""
    root = classify_setup(tmp_path_factory.mktemp("ft-resume"))
    cfg = finetune_config("classify", root / "train.jsonl", root / "bb", SETS)
    result = finetune(cfg, root / "train.jsonl", root / "valid.jsonl", root / "full", log=lambda *a: None)
    return root, cfg, result


def interrupted_copy(root, keep_step: int, name: str):
    """The full run as it was when stopped just after the checkpoint of `keep_step`."""
    out = root / name
    shutil.copytree(root / "full", out)
    for step, path in list_checkpoints(out):
        if step > keep_step:
            shutil.rmtree(path)
    for later in ("model.safetensors", "model.safetensors.manifest.json", "eval_valid.json", "loss.png"):
        (out / later).unlink(missing_ok=True)
    return out


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_checkpoints_after_each_validation_but_the_last(full_run):
    root, _, result = full_run
    assert [step for step, _ in list_checkpoints(root / "full")] == [2, 4, 6]
    assert [e["step"] for e in result.evals] == [2, 4, 6, 8]


def test_resume_equals_the_run_never_stopped(full_run):
    root, cfg, full = full_run
    out = interrupted_copy(root, 4, "resumed")
    resumed = finetune(cfg, root / "train.jsonl", root / "valid.jsonl", out, log=lambda *a: None, resume="auto")
    assert [e["step"] for e in resumed.evals] == [2, 4, 6, 8]  # the first two come from the checkpoint
    assert len(resumed.losses) == 4  # steps 5-8 trained again
    assert losses(out) == pytest.approx(losses(root / "full"), rel=1e-6)
    assert json.loads((out / "eval_valid.json").read_text()) == pytest.approx(full.best)
    a, b = load_file(root / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_resume_under_dp2_and_the_refusals(full_run):
    root, _, _ = full_run
    out = interrupted_copy(root, 2, "dp2")
    args = ["finetune", "--task", "classify", "--train", "train.jsonl", "--valid", "valid.jsonl", "--from", "bb"]
    sets = [a for s in SETS for a in ("--set", s)]
    fresh = meshlm(*args, "--out", "dp2", *sets, cwd=root, check=False)
    assert fresh.returncode == 2 and "holds checkpoints of an earlier fine-tuning run" in fresh.stderr
    assert "--resume auto" in fresh.stderr and "Traceback" not in fresh.stderr
    meshlm(*args, "--out", "dp2", *sets, "--resume", "--nproc", "2", cwd=root)
    mine, full = losses(out), losses(root / "full")
    assert mine.keys() == full.keys()
    assert [mine[s] for s in sorted(mine)] == pytest.approx([full[s] for s in sorted(full)], rel=1e-5)
    assert (out / "model.safetensors").is_file()


def test_resume_with_another_task_model_or_a_broken_checkpoint_is_refused(full_run):
    root, cfg, _ = full_run
    out = interrupted_copy(root, 2, "broken")
    other = finetune_config("classify", root / "train.jsonl", root / "bb", [*SETS, "task.ngram_buckets=256"])
    with pytest.raises(ConfigError, match="task model differs from this run's \\(task.ngram_buckets"):
        finetune(other, root / "train.jsonl", root / "valid.jsonl", out, log=lambda *a: None, resume="auto")
    (list_checkpoints(out)[0][1] / "finetune_state.json").unlink()
    # The manifest lists the file: the checkpoint no longer verifies, and nothing else is there.
    with pytest.raises(ConfigError, match="no complete checkpoint|missing"):
        finetune(cfg, root / "train.jsonl", root / "valid.jsonl", out, log=lambda *a: None, resume=str(out))
