"""Dynamic work distribution for `meshlm predict` (issue 20): on a skewed input (a few long
answers among many short ones, greedy and sampled lines), `--nproc 2` writes the same records
as `--nproc 1`, in input order; a `--nproc 2` run killed part-way (launcher and workers, SIGKILL)
and run again answers only what is missing and ends with the same file.

Tiny random llama (tests/test_inference.py's run directory), real processes over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_inference import _records, run_dir  # noqa: F401  (the module-scoped fixture)

from meshlm.cli import main as cli_main

N_LINES = 16


def _write_skewed(path: Path) -> None:
    """1 line in 4 asks for 96 new tokens, the rest for 4; every third line sampled."""
    words = "def class return import for while with yield lambda try except raise".split()
    lines = []
    for i in range(N_LINES):
        obj = {
            "prompt": " ".join(words[i % len(words) : i % len(words) + 3]),
            "max_new_tokens": 96 if i % 4 == 1 else 4,
        }
        if i % 3 == 2:
            obj |= {"temperature": 0.9, "top_k": 30}
        lines.append(json.dumps(obj))
    path.write_text("\n".join(lines) + "\n")


def _argv(run: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", str(run), "--input", str(src), "--output", str(out), "--seed", "3"] + [
        "--no-progress",
        "--ignore-eos",
        "--max-batch",
        "3",
        *extra,
    ]


def _env() -> dict:
    # CPU ranks (gloo) even on a GPU machine: two NCCL ranks cannot share one GPU.
    return {**os.environ, "MESHLM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torch's launcher starts each worker in a session of
    its own, so killing the launcher's process group would leave the workers running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    for p in pids:  # gone (or a zombie: it writes nothing more) before the file is read
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{p}/stat").read_text().split(") ")[-1].startswith("Z"):
                    break
            except OSError:
                break
            time.sleep(0.05)


def test_skewed_predict_nproc_2_equals_nproc_1_in_order_and_resumes_after_a_kill(run_dir, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "skewed.jsonl"
    _write_skewed(src)
    one = tmp_path / "n1.jsonl"
    assert cli_main(_argv(run_dir, src, one)) == 0
    reference = _records(one)
    assert [r["line"] for r in reference] == list(range(1, N_LINES + 1))
    assert [r["completion_tokens"] for r in reference] == [96 if i % 4 == 1 else 4 for i in range(N_LINES)]

    two = tmp_path / "n2.jsonl"
    cmd = [sys.executable, "-m", "meshlm", *_argv(run_dir, src, two, "--nproc", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(two) == reference  # the same answers, in input order

    # interrupted: kill the launcher and its workers once a few answers are on disk, then run again
    # (on a busy machine the kill may land after the last answer: then try again, up to 3 times)
    killed = tmp_path / "killed.jsonl"
    for _attempt in range(3):
        killed.unlink(missing_ok=True)
        victim = subprocess.Popen(
            [sys.executable, "-m", "meshlm", *_argv(run_dir, src, killed, "--nproc", "2")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        deadline = time.monotonic() + 240
        try:
            while victim.poll() is None and time.monotonic() < deadline:
                if killed.is_file() and len(killed.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.05)
        finally:
            _kill_all(_descendants(victim.pid))
            victim.wait(timeout=60)
        answered = {json.loads(t)["line"] for t in killed.read_text().splitlines() if t.endswith("}")}
        if len(answered) < N_LINES:
            break
    partial = [json.loads(t) for t in killed.read_text().splitlines() if t.endswith("}")]
    assert all(r == reference[r["line"] - 1] for r in partial)  # what was written is already right
    proc = subprocess.run(
        [sys.executable, "-m", "meshlm", *_argv(run_dir, src, killed, "--nproc", "2")],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(killed) == reference
    kept = len({r["line"] for r in partial})
    assert kept < N_LINES  # it was interrupted part-way
    assert f"{N_LINES - kept} answered, {kept} already" in proc.stderr
