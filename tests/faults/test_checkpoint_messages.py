"""Messages that point the next step (item 12): a damaged checkpoint names the newest one that
still verifies (what --resume auto would use), an export of a run that does not exist says so."""

from __future__ import annotations

import shutil

import pytest

from meshlm.cli import main
from meshlm.config import load_config
from meshlm.train.checkpoint import CheckpointError
from meshlm.train.checkpoint_manifest import step_dir
from meshlm.train.trainer import train


def test_a_damaged_checkpoint_names_the_one_to_use_instead(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damaged = step_dir(run, 4) / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))

    cfg = load_config(str(run / "config.toml"))
    with pytest.raises(CheckpointError) as refused:
        train(cfg, run, log=lambda *a, **k: None, resume=str(step_dir(run, 4)))
    message = str(refused.value)
    assert "__0_0.distcp does not match its sha256" in message
    assert f"newest checkpoint that verifies is {step_dir(run, 2)} (step 2)" in message and "--resume auto" in message

    assert main(["export", "--run", str(run), "--step", "4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"meshlm export --run {run} --step 2" in err and "Traceback" not in err


def test_export_of_a_run_that_does_not_exist(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'nowhere'} does not exist" in err and "no complete checkpoint" not in err
    assert not (tmp_path / "x").exists()
