"""Shared by the server tests: a tiny run directory and a real `meshlm serve` process on a
free loopback port, stopped (and checked for leftover workers) at the end."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from processes import descendants_of

from meshlm.artifacts.weights_file import save_weights
from meshlm.config import Config
from meshlm.data.tokenizer import train_tokenizer
from meshlm.distributed.spawn import free_port
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig

V = 384
SRC = Path(__file__).resolve().parents[1] / "src"


def make_run(out: Path, max_seq_len: int = 1024) -> Path:
    """A run directory of a tiny llama (random weights: its greedy output is fixed by its seed)."""
    import textwrap

    cfg = TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=max_seq_len
    )
    out.mkdir(parents=True, exist_ok=True)
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, out / "model.safetensors")
    (out / "config.toml").write_text(Config(model=cfg).to_toml())
    train_tokenizer([inspect.getsource(json.decoder) + inspect.getsource(textwrap)], V, out / "tokenizer.json")
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    """`python -m meshlm serve ...` on 127.0.0.1; `url` is ready once started."""

    def __init__(
        self, run: Path, *args: str, api_key: str | None = None, env: dict | None = None, hf_dir: Path | None = None
    ):
        """Serve the run directory `run`, or with `hf_dir` that Hugging Face directory (--init-from-hf)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        # One thread per engine rank: the machines running the tests are small and shared.
        model = ["--init-from-hf", str(hf_dir)] if hf_dir else ["--run", str(run)]
        cmd = [sys.executable, "-m", "meshlm", "serve", *model, "--port", str(self.port), "--threads", "1"]
        cmd += args
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = {
            **os.environ,
            "PYTHONPATH": str(SRC),
            "OMP_NUM_THREADS": "1",
            "MESHLM_DEVICE": "cpu",
            **(env or {}),
        }
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.workers: list[int] = []
        self.model = run.name  # the served model's name (the run directory's)

    def wait_ready(self, timeout: float = 300.0) -> Server:  # a busy shared machine starts slowly
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.workers = descendants_of(self.proc.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError("the server was not ready in time")

    def engine_pids(self) -> list[int]:
        """The engine worker processes (not multiprocessing's resource tracker)."""
        return [p for p in self.workers if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body, timeout: float | httpx.Timeout = 60, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM; returns (exit code, output). Asserts that no worker outlives the server."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the server did not stop within the drain timeout") from None
        self.assert_no_workers_left()
        return self.proc.returncode, out

    def assert_no_workers_left(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in self.workers if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"worker processes {left} outlived the server"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in self.workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
