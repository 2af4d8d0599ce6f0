"""Ctrl-C during `fit(workers=2)` stops every worker: the caller gets KeyboardInterrupt and no
process it started outlives it. The caller is a plain script without a __main__ guard, as a
notebook cell would be; SIGINT goes to the caller only, as a Jupyter kernel interrupt does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = """
import sys
import meshlm

lm = meshlm.LanguageModel(
    "tiny-cpu", d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=512, max_seq_len=64, seq_len=32,
    micro_batch=4, global_batch=8, warmup_steps=1, eval_every=0, sample_tokens=0, max_bytes=200_000,
    cache_dir={cache!r},
)
try:
    lm.fit(steps=100_000, workers=2, run_dir={run!r}, verbose=False)
except KeyboardInterrupt:
    print("caller: KeyboardInterrupt", flush=True)
    sys.exit(0)
print("caller: finished without an interrupt", flush=True)
"""


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_ctrl_c_during_fit_stops_every_worker(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(SCRIPT.format(cache=str(tmp_path / "cache"), run=str(run))))
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert caller.poll() is None, caller.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _children(caller.pid)
        assert len(workers) >= 2  # the two ranks (and nothing else is required of the launcher)
        os.kill(caller.pid, signal.SIGINT)
        output, _ = caller.communicate(timeout=120)
    finally:
        if caller.poll() is None:
            caller.kill()
    assert "caller: KeyboardInterrupt" in output, output
    time.sleep(1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the interrupted fit"
