"""How the doctors of a job's nodes find each other: a TCPStore at the rendezvous endpoint.

The node whose own address is the endpoint's host serves the store on the endpoint's port (the
port torchrun's c10d rendezvous will use, so that it is proven free); the others connect to it.
Each node posts its facts, waits for every node's, then tries to reach every other node on the
address its collectives will use (a listener each doctor opens there, answering a token) and
posts what it found. The serving node waits until every node has read everything.
"""

from __future__ import annotations

import datetime
import errno
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from meshlm.config import ConfigError
from meshlm.distributed.doctor_facts import NodeFacts
from meshlm.distributed.interfaces import is_local_address

POLL_S = 0.2


class DoctorProblem(Exception):
    """A problem that stops the doctor before the nodes could compare notes (one paragraph)."""


@dataclass
class Exchanged:
    index: int  # this node's position in joining order
    nodes: list[NodeFacts]
    reach: dict[int, list[tuple[int, bool, str]]]  # node -> [(other node, reached, how)]
    hosting: bool


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--rdzv '{text}' must be HOST:PORT, the rendezvous endpoint torchrun will use "
            f"(--rdzv-endpoint), e.g. node0.cluster:29400."
        )
    return host.strip("[]"), int(port)


def _connect_error(host: str, port: int, waited: float, error: OSError | None) -> DoctorProblem:
    if isinstance(error, ConnectionRefusedError):
        return DoctorProblem(
            f"the rendezvous endpoint {host}:{port} refuses connections (waited {waited:.0f} s): that host is "
            f"reachable but nothing listens on port {port}. Give every node the same --rdzv HOST:PORT (the "
            f"address of the first node and a port that is free there), and start `meshlm doctor` on that "
            f"node too (it serves the endpoint while the doctors run)."
        )
    if isinstance(error, socket.gaierror):
        return DoctorProblem(
            f"the rendezvous host '{host}' does not resolve to an address on this node ({error.strerror}). "
            f"Use the first node's IP address or a name this node's resolver knows (check /etc/hosts, DNS)."
        )
    reason = "no reply" if error is None or isinstance(error, TimeoutError) else (error.strerror or str(error))
    return DoctorProblem(
        f"the rendezvous endpoint {host}:{port} is unreachable from this node ({reason}, waited {waited:.0f} s): "
        f"no route to that address, a firewall dropping the port, or the wrong address. Check that "
        f"{host} is the first node's address on the network the nodes share, that this node's "
        f"interface on that network is up, and that port {port} is open between the nodes."
    )


def _port_free(port: int) -> OSError | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            return e
    return None


def open_store(host: str, port: int, deadline: float) -> tuple[dist.TCPStore, bool]:
    """The doctors' store and whether this node serves it."""
    timeout = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
    if is_local_address(host):
        busy = _port_free(port)
        if busy is not None:
            in_use = busy.errno == errno.EADDRINUSE
            raise DoctorProblem(
                f"port {port} of the rendezvous endpoint {host}:{port} "
                f"{'is already in use on this node' if in_use else f'cannot be bound here ({busy.strerror})'}: "
                f"torchrun's rendezvous could not listen there either. Stop whatever holds it (`ss -ltnp "
                f"'sport = :{port}'`, a previous job still running?) or pick another free port for "
                f"--rdzv / --rdzv-endpoint on every node."
            )
        return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout), True
    started, last = time.monotonic(), None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(3.0, max(0.1, deadline - time.monotonic()))):
                break
        except ConnectionRefusedError as e:  # maybe not started yet there: keep trying
            last = e
        except socket.gaierror as e:
            raise _connect_error(host, port, 0, e) from None
        except OSError as e:
            last = e
        time.sleep(POLL_S)
    else:
        raise _connect_error(host, port, time.monotonic() - started, last)
    return dist.TCPStore(host, port, is_master=False, timeout=timeout), False


class ProbeListener:
    """Accepts connections on this node's collective address and answers a token."""

    def __init__(self, address: str):
        self.token = secrets.token_hex(8)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((address, 0))  # raises OSError when no port can be bound there
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.token.encode())

    def close(self) -> None:
        self.sock.close()


def probe(address: str, port: int, token: str, timeout: float = 10.0) -> tuple[bool, str]:
    if not address or not port:
        return False, "it has no address to reach"
    started = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            answer = s.recv(64).decode(errors="replace")
    except TimeoutError:
        return False, f"no reply from {address}:{port} within {timeout:g} s"
    except OSError as e:
        return False, f"{address}:{port}: {e.strerror or e}"
    if answer != token:
        return False, f"{address}:{port} is some other process, not that node's doctor"
    return True, f"{(time.monotonic() - started) * 1000:.1f} ms"


def _wait_for(store: dist.TCPStore, keys: list[str], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if store.check(keys):
            return True
        time.sleep(POLL_S)
    return store.check(keys)


def exchange(store: dist.TCPStore, hosting: bool, facts: NodeFacts, nnodes: int, deadline: float) -> Exchanged:
    index = store.add("doctor/joined", 1) - 1
    store.set(f"doctor/facts/{index}", facts.to_json())
    joined = 0
    while time.monotonic() < deadline:
        joined = store.add("doctor/joined", 0)
        if joined >= nnodes:
            break
        time.sleep(POLL_S)
    joined = store.add("doctor/joined", 0)
    if joined < nnodes:
        raise DoctorProblem(
            f"only {joined} of {nnodes} nodes joined the rendezvous before the time-out: the other nodes have "
            f"not started `meshlm doctor`, or they use another --rdzv endpoint or --nnodes. Start it on every "
            f"node with the same --rdzv HOST:PORT and --nnodes {nnodes} (within --timeout seconds of each other)."
        )
    if joined > nnodes:
        raise DoctorProblem(
            f"{joined} nodes joined the rendezvous but --nnodes is {nnodes}: give every node the same --nnodes "
            f"(the number of nodes of the job), and make sure no other job's doctor uses this endpoint."
        )
    nodes = [NodeFacts.from_json(store.get(f"doctor/facts/{i}").decode()) for i in range(nnodes)]
    mine = [(i, *probe(n.address, n.probe_port, n.token)) for i, n in enumerate(nodes) if i != index]
    store.set(f"doctor/reach/{index}", json.dumps(mine))
    reach_keys = [f"doctor/reach/{i}" for i in range(nnodes)]
    reach: dict[int, list] = {}
    if _wait_for(store, reach_keys, deadline):
        reach = {i: [tuple(r) for r in json.loads(store.get(k))] for i, k in enumerate(reach_keys)}
    else:
        reach = {index: mine}
    store.set(f"doctor/done/{index}", "1")
    if hosting:  # keep serving the store until every node has read it
        _wait_for(store, [f"doctor/done/{i}" for i in range(nnodes)], deadline + 5)
    return Exchanged(index, nodes, reach, hosting)
