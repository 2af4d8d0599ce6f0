"""The task commands follow the same rules as the language-model ones: `meshlm finetune`, and
`meshlm predict` / `eval` of a task run. Worker counts, output locations and data files are
checked before any work (exit 2, one paragraph); a non-finite fine-tuning step stops with exit
1 naming the step; a model that does not fit on the disk is kept elsewhere; predict refuses to
resume another model's answers, exits 1 when no line succeeded, and leaves no temporary file."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from task_fixtures import classify_records, classify_setup

from faults.conftest import fill, nan_loss_at
from meshlm.artifacts.weights_file import load_weights, save_weights
from meshlm.cli import main
from meshlm.tasks.config import load_task_config
from meshlm.tasks.predict import load_task_model
from meshlm.tasks.spec import task_model_config

QUICK = [
    *("--set", "task.epochs=1", "--set", "train.progress=false"),
    *("--set", "train.micro_batch=8", "--set", "train.global_batch=16"),
    # A small n-gram table, so a run stays small enough for the tests' 4 MiB disks.
    *("--set", "task.ngram_buckets=1024"),
]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return classify_setup(tmp_path_factory.mktemp("task-faults"), n_train=32, n_valid=8)


def _finetune_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--task",
        "classify",
        "--train",
        str(root / "train.jsonl"),
        "--valid",
        str(root / "valid.jsonl"),
        "--from",
        str(root / "bb"),
        "--out",
        str(out),
        *QUICK,
        *extra,
    ]


@pytest.fixture(scope="module")
def task_run(task_files):
    out = task_files / "clf"
    assert main(_finetune_args(task_files, out)) == 0
    return out


def _one_error(capsys, code_expected: int, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == code_expected, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("meshlm: error:")]
    assert len(errors) == 1, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_finetune_refuses_workers_outputs_and_data_before_work(task_files, tmp_path, capsys):
    args = _finetune_args(task_files, tmp_path / "never")
    _one_error(capsys, 2, main([*args, "--nproc", "0"]), "--nproc must be at least 1")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_error(capsys, 2, main(_finetune_args(task_files, a_file / "run")), "cannot write --out", "which is a file")
    # Under --nproc the validation file is read by the launcher: one message, before any worker.
    missing = [*args[:6], str(tmp_path / "missing.jsonl"), *args[7:], "--nproc", "2"]
    _one_error(capsys, 2, main(missing), "missing.jsonl not found")
    assert not (tmp_path / "never").exists(), "nothing was written"


def test_task_outputs_in_a_read_only_directory_are_refused(task_files, task_run, small_disk, tmp_path, capsys):
    disk = small_disk(4 << 20)
    run = disk / "clf"
    shutil.copytree(task_run, run)  # a task run on a file system then made read-only
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
    code = main(_finetune_args(task_files, disk / "new"))
    _one_error(capsys, 2, code, f"cannot write --out: {disk} does not accept new files")
    code = main(["eval", "--run", str(run), "--data", str(task_files / "valid.jsonl")])
    _one_error(capsys, 2, code, f"cannot write the scores into --run: {run} does not accept new files")
    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "the cat"}\n')
    code = main(["predict", "--run", str(run), "--input", str(good), "--output", str(run / "o.jsonl")])
    _one_error(capsys, 2, code, "cannot write --output", "does not accept new files")


def test_a_nan_fine_tuning_step_stops_with_exit_1(task_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    nan_loss_at(monkeypatch, {1})
    message = _one_error(capsys, 1, main(_finetune_args(task_files, out)), "fine-tuning stopped at step 2")
    assert "the loss is nan" in message and "no model was written" in message
    assert "train.skip_nonfinite_steps" in message and not (out / "model.safetensors").exists()


def test_finetuned_model_that_does_not_fit_is_kept_elsewhere(task_files, small_disk, tmp_path, monkeypatch, capsys):
    disk = small_disk(4 << 20)
    fill(disk, leave=96 * 1024)  # the run's small files fit, its model (~0.2 MiB) does not
    out = disk / "run"
    spare = tmp_path / "system-tmp"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))  # as TMPDIR=spare would
    code = main(_finetune_args(task_files, out))
    message = _one_error(capsys, 1, code, f"disk full at {out / 'model.safetensors'}: need", "were written to")
    (rescued,) = list(spare.glob("meshlm-rescued-run-*"))
    assert str(rescued) in message and not (out / "model.safetensors").exists()
    assert load_task_config(rescued / "config.toml").task.name == "classify"
    load_task_model(rescued)  # complete, verified by its manifest, loadable as a task run


def test_task_predict_paths_failures_and_other_models(task_run, tmp_path, capsys):
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in classify_records(5, 3)))
    output = tmp_path / "out.jsonl"
    base = ["predict", "--run", str(task_run), "--output", str(output)]

    _one_error(capsys, 2, main([*base, "--input", str(tmp_path)]), "is a directory")
    _one_error(capsys, 2, main([*base, "--input", str(good), "--output", str(tmp_path)]), "cannot write --output")
    _one_error(capsys, 2, main([*base, "--input", str(good), "--nproc", "0"]), "--nproc must be at least 1")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "typo"}\nnot json\n')
    failed = tmp_path / "failed.jsonl"
    code = main(["predict", "--run", str(task_run), "--input", str(bad), "--output", str(failed)])
    err = capsys.readouterr().err
    assert code == 1 and "2 failed line(s)" in err and "no line of" in err, err
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left"

    assert main([*base, "--input", str(good)]) == 0
    first = output.read_text()
    assert len(first.splitlines()) == 5 and (tmp_path / "out.jsonl.settings.json").is_file()
    assert main([*base, "--input", str(good), "--no-verify"]) == 0
    assert "5 already in" in capsys.readouterr().err

    # Another model: the same run with one weight changed (and its manifest rewritten).
    other = tmp_path / "other"
    shutil.copytree(task_run, other)
    model_cfg = task_model_config(load_task_config(other / "config.toml"))
    state = load_weights(other / "model.safetensors", model_cfg).state_dict()
    name = next(iter(state))
    state[name] = state[name] + torch.ones_like(state[name])
    save_weights(state, model_cfg, other / "model.safetensors")
    code = main(["predict", "--run", str(other), "--input", str(good), "--output", str(output)])
    _one_error(capsys, 2, code, "holds answers made with other settings", "the model weights: sha256", "--overwrite")
    assert output.read_text() == first, "a refused run leaves the answers as they were"
    assert main(["predict", "--run", str(other), "--input", str(good), "--output", str(output), "--overwrite"]) == 0
    assert "5 answered, 0 already" in capsys.readouterr().err

    _one_error(capsys, 2, main(["eval", "--run", str(task_run), "--data", str(tmp_path)]), "is a directory")
