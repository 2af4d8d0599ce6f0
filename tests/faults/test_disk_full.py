"""A full disk (a tmpfs of a few MiB): during a checkpoint save, while a save is writing, and at
the final weights. Each ends with exit 1 and "disk full at PATH: need N MiB, M free", keeps the
previous checkpoint intact and resumable, leaves no partial checkpoint, and never loses the
trained weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from faults.conftest import assert_clean_error, command_env, fill, meshlm, remount, sets, tiny_overrides
from meshlm.artifacts.weights_file import load_weights
from meshlm.config import load_config
from meshlm.train.checkpoint_manifest import list_checkpoints, step_dir, verify_checkpoint
from meshlm.train.run_faults import checkpoint_bytes, final_weights_bytes
from meshlm.utils.errors import DiskFullError

DRIVER = Path(__file__).resolve().parents[1] / "drivers" / "fill_disk_during_save.py"


def test_checkpoint_that_does_not_fit_stops_training_keeps_the_previous_one_and_resumes(
    fault_data, small_disk, tmp_path
):
    """The disk holds the first checkpoint but not a second one next to it: the save of step 2
    is refused before writing, step 1 stays intact, and after the disk grows --resume auto
    finishes the run."""
    overrides = tiny_overrides(fault_data, "train.steps=3", "train.checkpoint_every=1")
    cfg = load_config(None, overrides)
    first = checkpoint_bytes(cfg, tmp_path / "fresh")  # the estimate the first save is checked against
    disk = small_disk(first + 96 * 1024)
    run = disk / "run"

    proc = meshlm("train", *sets(overrides), "--out", run)
    message = assert_clean_error(proc, 1, f"disk full at {step_dir(run, 2)}: need", "MiB free", "--resume auto")
    assert f"{step_dir(run, 1)} (step 1) is intact" in message
    assert [s for s, _ in list_checkpoints(run)] == [1]
    verify_checkpoint(step_dir(run, 1))
    assert not list((run / "checkpoints").glob("*.tmp")), "no partial checkpoint is left"
    assert not (run / "model.safetensors").exists()

    remount(disk, 16 << 20)
    resumed = meshlm("train", *sets(overrides), "--out", run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step_dir(run, 1)} at step 1" in resumed.stdout
    load_weights(run / "model.safetensors", cfg.model)


def test_disk_filling_up_while_a_checkpoint_is_written(fault_data, small_disk):
    """The driver fills the disk just as torch.distributed.checkpoint starts writing the data of
    step 2 (after meshlm's free-space check passed): the write fails with ENOSPC, which meshlm
    reports as a full disk, removing the partial checkpoint."""
    disk = small_disk(16 << 20)
    run = disk / "run"
    overrides = tiny_overrides(fault_data, "train.steps=3", "train.checkpoint_every=1")
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "2", "train", *sets(overrides), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env=command_env(),
    )
    assert "filled the disk" in proc.stdout, proc.stderr[-3000:]
    assert_clean_error(proc, 1, f"disk full at {step_dir(run, 2)}", "ran out of space", "(step 1) is intact")
    assert [s for s, _ in list_checkpoints(run)] == [1]
    verify_checkpoint(step_dir(run, 1))
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_final_weights_that_do_not_fit_are_written_elsewhere(fault_data, small_disk, tmp_path):
    """The disk has room for the weights when training starts, but the run's own files fill it
    before the end: model.safetensors does not fit, so the weights go to the temporary directory
    and the message says where."""
    overrides = tiny_overrides(fault_data, "train.steps=2")
    cfg = load_config(None, overrides)
    disk = small_disk(4 << 20)
    fill(disk, leave=final_weights_bytes(cfg) + 8 * 1024)  # enough to start; the run's files take more
    run = disk / "run"
    spare = tmp_path / "system-tmp"
    spare.mkdir()
    proc = meshlm("train", *sets(overrides), "--out", run, env=command_env(TMPDIR=str(spare)))
    message = assert_clean_error(proc, 1, f"disk full at {run / 'model.safetensors'}: need", "were written to")
    (rescued,) = list(spare.glob("meshlm-rescued-run-*"))
    assert str(rescued) in message
    assert not (run / "model.safetensors").exists()
    assert sorted(p.name for p in rescued.iterdir()) == [
        "config.toml",
        "model.safetensors",
        "model.safetensors.manifest.json",
        "tokenizer.json",
    ]
    load_weights(rescued / "model.safetensors", cfg.model)  # complete, and verified by its manifest


def test_final_weights_point_to_the_final_checkpoint_and_export_needs_room(tiny_run, small_disk):
    """With a checkpoint of the final step, the message names it and the export command; an
    export into a full disk is refused by the same free-space check."""
    from meshlm.cli import main
    from meshlm.train.run_faults import save_final_weights

    cfg = load_config(str(tiny_run / "config.toml"))
    weights = load_weights(tiny_run / "model.safetensors", cfg.model).state_dict()
    disk = small_disk(4 << 20)
    run = disk / "run"
    shutil.copytree(step_dir(tiny_run, 4), step_dir(run, 4))
    fill(disk, leave=64 * 1024)
    with pytest.raises(DiskFullError) as raised:
        save_final_weights(weights, cfg, run, steps=4)
    message = str(raised.value)
    assert f"disk full at {run / 'model.safetensors'}" in message
    assert f"final checkpoint {step_dir(run, 4)}" in message and f"meshlm export --run {run} --out {run}" in message
    assert not (run / "model.safetensors").exists() and not (run / "model.safetensors.tmp").exists()

    assert main(["export", "--run", str(tiny_run), "--out", str(disk / "exported")]) == 1
    (disk / "filler.bin").unlink()
    assert main(["export", "--run", str(run), "--out", str(run)]) == 0  # the command the message gives
    load_weights(run / "model.safetensors", cfg.model)
