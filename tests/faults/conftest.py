"""Shared fixtures of the fault suite: a tiny trained run, real small file systems (tmpfs, also
read-only), and a runner for the `meshlm` command in a subprocess.

Faults are injected for real: a tmpfs of a few MiB is a full disk, a read-only mount is an
unwritable directory (root ignores permission bits, so chmod would not do), signals go to the
launcher process once the harness sees progress. The tests need root for the mounts and skip
(with the reason) where it is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# A model of ~30k parameters on 16-token windows: every command runs in about a second.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=0",
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.micro_batch=2",
    "train.global_batch=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
]


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def meshlm(*args: str, timeout: float = 300, env: dict | None = None, cwd=None, **popen) -> subprocess.CompletedProcess:
    """`python -m meshlm ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "meshlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or command_env(),
        cwd=cwd,
        **popen,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit `code`, no traceback, one `meshlm: error:` paragraph that contains every needle."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("meshlm: error:")]
    assert len(errors) == 1, f"expected one error paragraph, got {len(errors)}:\n{err[-3000:]}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="session")
def fault_data(prepare_corpus):
    """The prepared corpus of TINY (a data cache directory), shared by every fault test."""
    return prepare_corpus(TINY)


def tiny_overrides(cache: Path, *extra: str) -> list[str]:
    return [*TINY, f'data.cache_dir="{cache}"', *extra]


@pytest.fixture(scope="session")
def tiny_run(fault_data, tmp_path_factory):
    """A finished run of 4 steps with checkpoints at steps 2 and 4: config, tokenizer,
    model.safetensors (+ manifest), checkpoints/step-000002 and step-000004."""
    from meshlm.config import load_config
    from meshlm.train.trainer import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config(None, tiny_overrides(fault_data, "train.steps=4", "train.checkpoint_every=2"))
    train(cfg, out, log=lambda *a, **k: None)
    return out


# ----------------------------------------------------------------------------- small file systems


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the fault tests inject full disks and read-only mounts)")


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, f"meshlm-fault-{uuid.uuid4().hex[:8]}", str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size_bytes) -> a directory on a fresh tmpfs of that size (unmounted after the
    test); `remount(path, size)` grows or shrinks it."""
    _require_root()
    mounted: list[Path] = []

    def make(size: int, name: str = "disk") -> Path:
        target = tmp_path / name
        _mount(target, f"size={size}")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        _unmount(target)


def remount(target: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(target)], check=True, capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only directory (a tmpfs remounted read-only) holding one file, `existing.txt`."""
    _require_root()
    target = tmp_path / "read-only"
    _mount(target, "size=1m")
    try:
        (target / "existing.txt").write_text("kept\n")
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)
        yield target
    finally:
        _unmount(target)


def fill(directory: Path, leave: int) -> Path:
    """Write a filler file into `directory` so that about `leave` bytes stay free."""
    import shutil

    free = shutil.disk_usage(directory).free
    filler = directory / "filler.bin"
    with open(filler, "wb") as f:
        remaining = max(free - leave, 0)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            n = min(remaining, len(block))
            f.write(block[:n])
            remaining -= n
    return filler


def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """Training steps (0-based) whose loss is NaN, in this process: torch's cross-entropy under
    autograd returns NaN while the step runner works on one of `steps` (language modelling and
    task fine-tuning alike; tests/drivers/nan_loss_at_steps.py does the same in a command)."""
    import torch
    import torch.nn.functional as F

    from meshlm.train.step import StepRunner

    current = {"step": -1}
    forward_backward, loss = StepRunner.forward_backward, F.cross_entropy

    def tracking(self, step):
        current["step"] = step
        return forward_backward(self, step)

    def poisoned(*args, **kwargs):
        value = loss(*args, **kwargs)
        return value * float("nan") if torch.is_grad_enabled() and current["step"] in steps else value

    monkeypatch.setattr(StepRunner, "forward_backward", tracking)
    monkeypatch.setattr(F, "cross_entropy", poisoned)


# ----------------------------------------------------------------------------- running commands


class Running:
    """A `meshlm` command running in the background; its output is collected as it comes."""

    def __init__(self, args, env=None, **popen):
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshlm", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or command_env(),
            **popen,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            sink.append(chunk)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, condition, what: str, timeout: float = 240.0) -> None:
        """Poll `condition()` until it holds; fail if the command ends first."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the command ended before {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"no {what} within {timeout} s:\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 120.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self._readers:
            reader.join(timeout=10)
        return code
