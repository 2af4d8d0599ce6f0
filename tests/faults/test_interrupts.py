"""Ctrl-C and SIGTERM under several workers, sent to the launcher once the harness sees
progress: one line, every worker stopped (no process of the command left), exit 130 / 143,
and what was finished is kept (checkpoints resume, answered lines stay); --nproc below 1 is
refused, more workers than cores get one warning line."""

from __future__ import annotations

import json
import os
import signal
import time

from processes import descendants_of, environment_of
from task_fixtures import classify_setup

from faults.conftest import Running, assert_clean_error, meshlm, sets, tiny_overrides
from meshlm.cli import main
from meshlm.train.checkpoint_manifest import list_checkpoints
from meshlm.train.metrics import read_metrics

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _workers_started(run: Running, n: int) -> bool:
    ranks = {environment_of(pid).get("RANK") for pid in descendants_of(run.proc.pid)}
    return {str(r) for r in range(n)} <= ranks


def _interrupt(run: Running, sig: signal.Signals) -> None:
    """Send `sig` to the launcher; then: its exit code, one line, no traceback, no process left."""
    workers = descendants_of(run.proc.pid)
    assert workers, "the command runs its work in worker processes"
    os.kill(run.proc.pid, sig)
    code = run.finish()
    err = run.stderr
    assert code == EXIT[sig], f"exit {code}:\n{err[-3000:]}"
    assert "Traceback" not in err and "death signal" not in err and "closing signal" not in err, err[-3000:]
    interrupted = [line for line in err.splitlines() if line.startswith("meshlm: interrupted")]
    assert interrupted == [interrupted[0]] and sig.name in interrupted[0], err[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived the launcher"


def _interrupted_past_a_checkpoint(run: Running, run_dir, first: int) -> list[int]:
    """Ctrl-C once the run logged a step past its first checkpoint (step `first`): the steps of
    the checkpoints kept, which the message offers to resume; no final model."""

    def past_first_checkpoint() -> bool:
        try:
            return bool(list_checkpoints(run_dir)) and read_metrics(run_dir / "metrics.jsonl")[-1]["step"] > first
        except (OSError, ValueError, IndexError, KeyError):
            return False

    run.wait_for(past_first_checkpoint, "a step after the first checkpoint")
    _interrupt(run, signal.SIGINT)
    assert "--resume auto" in run.stderr
    saved = [s for s, _ in list_checkpoints(run_dir)]
    assert saved and not (run_dir / "model.safetensors").exists()
    return saved


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_nproc_below_one_is_refused(tiny_run, tmp_path, capsys):
    for argv in (
        ["train", "--nproc", "0", "--out", str(tmp_path / "r")],
        ["eval", "--run", str(tiny_run), "--data", "python-stdlib", "--nproc", "-1"],
        ["eval", "--run", str(tiny_run), "--data", "python-stdlib", "--nproc", "0"],
        ["predict", "--run", str(tiny_run), "--input", str(tiny_run / "config.toml"), "--output", "o", "--nproc", "0"],
        ["generate", "--run", str(tiny_run), "--prompt", "x", "--tp", "0"],
        ["train", "--nproc", "2", "--max-restarts", "-1", "--out", str(tmp_path / "r")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "must be at least 1" in err or "must be zero or positive" in err, err
        assert "Traceback" not in err and "ZeroDivisionError" not in err
    assert not (tmp_path / "r").exists()


def test_train_interrupted_under_two_workers_then_resumes(fault_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(fault_data, "train.steps=300", "train.checkpoint_every=50")  # dp = the world size
    run = Running(["train", *sets(overrides), "--out", run_dir, "--nproc", "2"])
    saved = _interrupted_past_a_checkpoint(run, run_dir, 50)
    assert saved[-1] < 300

    resumed = meshlm("train", *sets(overrides), "--out", run_dir, "--resume", "auto")  # one process, any layout
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved[-1]}" in resumed.stdout
    assert (run_dir / "model.safetensors").is_file()


def test_finetune_interrupted_under_two_workers_then_resumes(tmp_path):
    classify_setup(tmp_path)
    run_dir = tmp_path / "ft"
    files = ["--train", tmp_path / "train.jsonl", "--valid", tmp_path / "valid.jsonl", "--from", tmp_path / "bb"]
    overrides = ["task.epochs=0", "train.steps=400", "train.eval_every=10", "task.patience=0", "train.progress=false"]
    args = ["finetune", "--task", "classify", *files, "--out", run_dir, *sets([*overrides, "task.ngram_buckets=512"])]
    run = Running([*args, "--nproc", "2"])
    saved = _interrupted_past_a_checkpoint(run, run_dir, 10)
    assert saved[-1] < 400

    resumed = meshlm(*args, "--resume", "auto")  # one process, any layout
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved[-1]}" in resumed.stdout
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "eval_valid.json").is_file()


def test_predict_terminated_under_two_workers_keeps_its_answers(tiny_run, tmp_path, capsys):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"def f{i}("}) + "\n" for i in range(48)))
    argv = ["predict", "--run", tiny_run, "--input", source, "--output", output, "--max-new-tokens", "24"]
    run = Running([*argv, "--max-batch", "1", "--nproc", "2", "--no-progress"])
    run.wait_for(lambda: output.is_file() and '"text"' in output.read_text(), "a first answer")
    _interrupt(run, signal.SIGTERM)
    assert "run the same command again to continue" in run.stderr
    assert not (tmp_path / "out.jsonl.tmp").exists()
    kept = [json.loads(line) for line in output.read_text().splitlines()]  # every line whole
    assert kept and all("text" in record for record in kept)

    assert main([*map(str, argv), "--no-progress"]) == 0  # the same command resumes
    assert f"{len(kept)} already in" in capsys.readouterr().err
    assert sorted(json.loads(line)["line"] for line in output.read_text().splitlines()) == list(range(1, 49))


def test_eval_interrupted_with_more_workers_than_cores(tiny_run):
    """One core for the launcher (its affinity, which the workers inherit): two workers get the
    oversubscription warning, once; then Ctrl-C."""
    core = min(os.sched_getaffinity(0))
    run = Running(
        ["eval", "--run", tiny_run, "--data", "python-stdlib", "--max-bytes", "3000000", "--nproc", "2"],
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    run.wait_for(lambda: _workers_started(run, 2), "two workers")
    time.sleep(1.0)
    _interrupt(run, signal.SIGINT)
    warnings = [line for line in run.stderr.splitlines() if line.startswith("meshlm: warning:")]
    assert len(warnings) == 1 and "2 workers on 1 CPU core" in warnings[0], run.stderr[-2000:]


def test_generate_terminated_under_tensor_parallel(tiny_run):
    prompts = [x for i in range(40) for x in ("--prompt", f"class C{i}:")]
    run = Running(["generate", "--run", tiny_run, *prompts, "--max-new-tokens", "40", "--max-batch", "1", "--tp", "2"])
    run.wait_for(lambda: "class C0:" in run.stdout and len(run.stdout) > 20, "streamed text")
    _interrupt(run, signal.SIGTERM)


def test_single_process_sigterm_unwinds_like_ctrl_c(tiny_run, tmp_path):
    """SIGTERM in one process: the same one line as Ctrl-C (exit 143), temporary files removed."""
    sig = signal.SIGTERM
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"x{i}"}) + "\n" for i in range(400)))
    run = Running(
        ["predict", "--run", tiny_run, "--input", source, "--output", output, "--max-batch", "1", "--no-progress"]
    )
    run.wait_for(lambda: output.is_file() and '"text"' in output.read_text(), "a first answer")
    os.kill(run.proc.pid, sig)
    assert run.finish() == EXIT[sig]
    assert run.stderr.strip().splitlines()[-1].startswith(f"meshlm: interrupted ({sig.name})")
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_a_missing_corpus_is_found_before_any_worker_starts(tmp_path):
    """Item 9: under --nproc the data source is checked by the launcher: one message, exit 2."""
    missing = tiny_overrides(tmp_path / "cache", f'data.source="{tmp_path / "nowhere"}"')
    proc = meshlm("train", "--nproc", "2", *sets(missing), "--out", tmp_path / "run")
    assert_clean_error(proc, 2, f"data source '{tmp_path / 'nowhere'}' does not exist")
    assert "torch.distributed" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
