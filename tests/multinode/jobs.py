"""torchrun jobs across the namespace hosts of hosts.py: one agent per host, as on real nodes.

    job = Job(hosts, tmp_path, ["train", "--set", ...], nproc_per_node=2)
    job.start()                 # torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:29400 ...
    codes = job.wait(timeout=120)
    job.log(1)                  # host 1's agent and workers, stdout and stderr

Every agent runs `python -m torch.distributed.run` (torchrun) inside its host with the address
of that host as --local-addr (the hosts share one hostname, as containers often do) and gloo
bound to the host's interface (GLOO_SOCKET_IFNAME). The first host's agent serves the
rendezvous store (is_host=true).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from multinode.hosts import IFNAME, NetnsHosts

SRC = Path(__file__).resolve().parents[2] / "src"
RDZV_PORT = 29400


def node_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
        "MESHLM_DEVICE": "cpu",
        "GLOO_SOCKET_IFNAME": IFNAME,
        # Every restart round gets a fresh store (see meshlm.distributed.launch).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    env.pop("RANK", None)
    env.update(extra)
    return env


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


class Job:
    def __init__(
        self,
        hosts: NetnsHosts,
        logs: Path,
        command: list[str],
        nnodes: int | str = 2,
        nproc_per_node: int = 1,
        max_restarts: int = 0,
        rdzv_conf: str = "",
        env: dict[str, str] | None = None,
        name: str = "job",
    ):
        self.hosts, self.logs, self.command = hosts, Path(logs), command
        self.nnodes, self.nproc, self.max_restarts = nnodes, nproc_per_node, max_restarts
        self.rdzv_conf, self.env, self.name = rdzv_conf, env or node_env(), name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, object] = {}
        self.starts: dict[int, int] = {}

    def argv(self, host: int) -> list[str]:
        conf = f"is_host={'true' if host == 0 else 'false'}" + (f",{self.rdzv_conf}" if self.rdzv_conf else "")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(self.nnodes),
            "--nproc-per-node",
            str(self.nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{self.hosts.addrs[0]}:{RDZV_PORT}",
            "--rdzv-id",
            self.name,
            "--rdzv-conf",
            conf,
            "--local-addr",
            self.hosts.addrs[host],
            "--max-restarts",
            str(self.max_restarts),
            "-m",
            "meshlm",
            *self.command,
        ]

    def start(self, hosts: list[int] | None = None) -> Job:
        for host in hosts if hosts is not None else range(int(str(self.nnodes).split(":")[-1])):
            self.starts[host] = self.starts.get(host, 0) + 1
            self.procs[host] = self.hosts.start(host, self.argv(host), self.log_path(host), env=self.env)
        return self

    def log_path(self, host: int) -> Path:
        return self.logs / f"{self.name}-host{host}.log"

    def log(self, host: int) -> str:
        return self.log_path(host).read_text(errors="replace")

    def wait(self, timeout: float, hosts: list[int] | None = None) -> dict[int, int]:
        """Exit codes of the agents, waiting up to `timeout` seconds in all; an agent still running
        then fails the test with the logs."""
        deadline = time.monotonic() + timeout
        codes = {}
        for host in hosts if hosts is not None else sorted(self.procs):
            try:
                codes[host] = self.procs[host].wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                raise AssertionError(
                    f"host {host}'s agent still runs after {timeout:.0f} s.\n" + self.all_logs()
                ) from None
        return codes

    def all_logs(self) -> str:
        return "\n".join(f"--- host {h} ---\n{self.log(h)[-6000:]}" for h in sorted(self.procs))


def logged_steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in record:
            records.append(record)
    return records


def wait_for_step(run: Path, step: int, job: Job, timeout: float = 120) -> float:
    """Wait until metrics.jsonl logs `step`; returns the time it was seen (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in logged_steps(run)):
            return time.monotonic()
        if all(p.poll() is not None for p in job.procs.values()):
            raise AssertionError(f"the job ended before step {step}.\n" + job.all_logs())
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged within {timeout} s.\n" + job.all_logs())
