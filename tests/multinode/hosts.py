"""Separate network hosts on one machine: network namespaces joined by veth pairs and a bridge.

    with NetnsHosts(2) as hosts:                 # host0 = 10.77.0.1, host1 = 10.77.0.2
        agent = hosts.start(0, ["python", "-m", "torch.distributed.run", ...], log)
        hosts.partition(1)                       # take host1's link down (a partition)
        hosts.drop_packets(1, percent=5)         # nftables: drop 5% of host1's packets at random

Each host is a network namespace with its own loopback, one interface `eth0` with a private
address, and no route anywhere else: every packet stays between these namespaces. The bridge
lives in a namespace of its own (the "switch"), so nothing is added to the machine's own
network; deleting the namespaces (always, also on failure or Ctrl-C) removes every interface.
Processes started in a host are killed with it. Namespace names carry the creating process's
id, so concurrent sessions never collide, and leftovers of a crashed session (its process
gone) are removed by the next one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "mlnet"
SUBNET = "10.77.0"
IFNAME = "eth0"


def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be built here (None when they can)."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add); run the suite as root, as CI does"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing; install iproute2"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process in namespace `ns` (the host 'loses power')."""
    for _ in range(20):
        pids = _pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_stale() -> None:
    """Namespaces left by a session whose process is gone (killed before its teardown ran)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit():
            if not Path(f"/proc/{parts[1]}").exists():
                kill_namespace_processes(name)
                _ip("netns", "del", name, check=False)


class NetnsHosts:
    """`n` hosts (namespaces) on one bridge; use as a context manager."""

    def __init__(self, n: int, subnet: str = SUBNET):
        self.n = n
        tag = f"{PREFIX}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.switch = f"{tag}-sw"
        self.names = [f"{tag}-h{i}" for i in range(n)]
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        self.ifname = IFNAME
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> NetnsHosts:
        remove_stale()
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # One veth pair per host: eth0 inside the host, port{i} on the switch's bridge.
                _ip(
                    "link", "add", IFNAME, "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", self.switch
                )
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
                _ip("-n", ns, "link", "set", IFNAME, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in [*self.names, self.switch]:
            kill_namespace_processes(ns)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in [*self.names, self.switch]:
            _ip("netns", "del", ns, check=False)

    # ------------------------------------------------------------------ processes

    def start(self, host: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` inside host `host`, stdout and stderr into `log`."""
        handle = open(log, "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names[host], *argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        handle.close()
        self.procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120):
        """Run `argv` inside host `host` to completion; returns the CompletedProcess."""
        return subprocess.run(
            ["ip", "netns", "exec", self.names[host], *argv], capture_output=True, text=True, env=env, timeout=timeout
        )

    def kill_host(self, host: int) -> None:
        """Every process of host `host` dies at once (its agent and all of its workers)."""
        kill_namespace_processes(self.names[host])

    # ------------------------------------------------------------------ faults

    def partition(self, host: int) -> None:
        """Cut host `host` off: its switch port goes down (the cable is pulled)."""
        _ip("-n", self.switch, "link", "set", f"port{host}", "down")

    def heal(self, host: int) -> None:
        _ip("-n", self.switch, "link", "set", f"port{host}", "up")

    def drop_packets(self, host: int, percent: float) -> None:
        """nftables inside host `host`: drop `percent`% of its incoming and outgoing packets on eth0,
        chosen at random (numgen random); loopback traffic is untouched."""
        if shutil.which("nft") is None:
            raise RuntimeError("nft is missing; install Debian's nftables package")
        per_mille = int(round(percent * 10))
        rules = (
            "table inet faults {\n"
            f"  chain input {{ type filter hook input priority 0; iifname {IFNAME} numgen random mod 1000 < {per_mille} counter drop; }}\n"
            f"  chain output {{ type filter hook output priority 0; oifname {IFNAME} numgen random mod 1000 < {per_mille} counter drop; }}\n"
            "}\n"
        )
        proc = subprocess.run(
            ["ip", "netns", "exec", self.names[host], "nft", "-f", "-"], input=rules, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nft failed: {proc.stderr.strip()}")

    def dropped_packets(self, host: int) -> int:
        """Packets the drop rules of host `host` have dropped so far (nft counters)."""
        out = self.run(host, ["nft", "list", "table", "inet", "faults"]).stdout
        return sum(int(m) for m in re.findall(r"counter packets (\d+)", out))
