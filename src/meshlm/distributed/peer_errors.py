"""A collective that failed because of another node, explained: which node, what happened, what to do.

gloo reports a dead peer as `Read error [10.77.0.2]:14991: Connection reset by peer` and a
partitioned one as `Timed out waiting 600000ms for recv operation to complete`, neither naming
a node or a fix. At start every rank records the address its collectives use, its host name
and its node rank in the job's store (`publish_node`); when a collective fails,
`explain_peer_failures` turns the error into one paragraph:

- a connection reset or closed by a peer: that peer's node (address, host, ranks) lost its
  processes; what the elastic agent does about it (restarts from the last complete checkpoint
  once every node is back) and what to do when the node is gone for good;
- a time-out: every other node is probed (a TCP connection attempt: refused or accepted means
  the node answers, silence or "no route" means it does not) and the ones that do not answer
  are named, with `train.collective_timeout_s`, the setting that bounds the wait.

Errors that are not about peers pass through unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch.distributed as dist

from meshlm.distributed.env import LaunchEnv, NetworkEnv, read_network_env
from meshlm.distributed.interfaces import collective_interface
from meshlm.utils.errors import RunError

_KEY = "meshlm/node/{rank}"
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)")
_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
PROBE_TIMEOUT_S = 3.0


class PeerFailure(RunError):
    """A collective failed because of another node; the message names it and the fix. (A
    RunError, a failure during work: the CLI prints it as one paragraph, without a traceback,
    and exits 1, the code of every lost worker; see docs/reliability.md.)"""


@dataclass(frozen=True)
class Node:
    index: int  # torchrun's node rank (GROUP_RANK), -1 when unknown
    address: str
    host: str
    ranks: tuple[int, ...]

    def describe(self) -> str:
        label = f"node {self.index}" if self.index >= 0 else "the node"
        ranks = ", ".join(map(str, self.ranks))
        return f"{label} at {self.address} (host {self.host}, rank{'s' if len(self.ranks) > 1 else ''} {ranks})"


def publish_node(env: LaunchEnv, net: NetworkEnv | None = None) -> None:
    """Record this rank's collective address, host name and node rank in the job's store."""
    net = net or read_network_env()
    address = collective_interface(env.backend, net, multi_node=False).address
    record = {"address": address, "host": socket.gethostname(), "node": net.node_rank}
    dist.distributed_c10d._get_default_store().set(_KEY.format(rank=env.rank), json.dumps(record))


def _read_nodes(world_size: int) -> list[Node] | None:
    """The job's nodes from the store, or None when the store does not answer within
    PROBE_TIMEOUT_S. (A TCPStore client whose server has gone silent can block well past its
    time-out, so the read runs in a daemon thread that is abandoned if it does not return.)"""
    found: list = []

    def read() -> None:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=PROBE_TIMEOUT_S))
        found.append([json.loads(store.get(_KEY.format(rank=r))) for r in range(world_size)])

    def guarded() -> None:
        try:
            read()
        except Exception:  # the store's host is gone or unreachable: "unknown"
            pass

    reader = threading.Thread(target=guarded, daemon=True)
    reader.start()
    reader.join(PROBE_TIMEOUT_S + 1)
    if not found:
        return None
    by_address: dict[str, list] = {}
    for rank, rec in enumerate(found[0]):
        by_address.setdefault(rec["address"], [rec, []])[1].append(rank)
    return [Node(rec["node"], address, rec["host"], tuple(ranks)) for address, (rec, ranks) in by_address.items()]


def answers(address: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether `address` answers a TCP connection attempt on `port` (accepted or refused both
    mean the node is there), with the reason when it does not."""
    try:
        with socket.create_connection((address, port or 9), timeout=timeout):
            return True, "accepts connections"
    except ConnectionRefusedError:
        return True, "answers (connection refused)"
    except TimeoutError:
        return False, f"no reply within {timeout:g} s"
    except OSError as e:
        return False, e.strerror or str(e)


def _lost_message(err: str, me: str, peer: str, nodes: list[Node] | None) -> str:
    node = next((n for n in nodes or [] if n.address == peer), None)
    who = node.describe() if node else f"the node at {peer}"
    return (
        f"{me} lost its connection to {who}: its processes died (the node crashed, was killed, lost power "
        f"or ran out of memory) while training. Under torchrun with --max-restarts the surviving agents "
        f"restart the job from the last complete checkpoint as soon as every node has rejoined (they wait "
        f"up to --rdzv-conf join_timeout seconds, default 600, then stop); start the lost node's agent again "
        f"with the same command (with --resume auto), or replace the node, or rerun the whole job with "
        f"--resume auto. The lost node's own log says why it died. (gloo: {err.strip().splitlines()[0][:200]})"
    )


def _timeout_message(me: str, my_address: str, timeout_s: float, nodes: list[Node] | None, net: NetworkEnv) -> str:
    setting = f"train.collective_timeout_s (now {timeout_s:g} s)"
    if nodes is None:  # the store is unreachable: its host is the one we can name
        targets = [(f"the store's node at {net.master_addr}", net.master_addr)] if net.master_addr else []
    else:
        targets = [(n.describe(), n.address) for n in nodes if n.address != my_address]
    with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        results = list(pool.map(lambda t: (t[0], *answers(t[1], net.master_port)), targets))
    silent = [f"{who} does not answer on the network ({reason})" for who, ok, reason in results if not ok]
    if silent:
        return (
            f"{me}: a collective waited {setting} and {'; '.join(silent)}: "
            f"the link between the nodes is down (a network partition) or that node is down. Restore the "
            f"network (run `meshlm doctor --rdzv HOST:PORT --nnodes N` on every node to check it), then rerun "
            f"with --resume auto. If the node is only slow (a long checkpoint save or evaluation on one rank), "
            f"raise {setting}."
        )
    return (
        f"{me}: a collective waited {setting} for its peers, and every other node answers on the network: "
        f"one of their processes is hung or much slower than the rest (look at their logs and stacks, e.g. "
        f"`py-spy dump`). If the wait is expected (a long checkpoint save, data preparation or evaluation on "
        f"one rank), raise {setting}."
    )


def explain(exc: BaseException, env: LaunchEnv, timeout_s: float, net: NetworkEnv | None = None) -> str | None:
    """The paragraph for a collective failure caused by a peer, or None for any other error."""
    if not isinstance(exc, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc)
    lost, timed_out = _LOST.search(text), _TIMEOUT.search(text)
    if not lost and not timed_out:
        return None
    net = net or read_network_env()
    my_address = collective_interface(env.backend, net, multi_node=False).address
    me = f"rank {env.rank} on node {net.node_rank} ({my_address})" if net.node_rank >= 0 else f"rank {env.rank}"
    nodes = _read_nodes(env.world_size)
    peer = _PEER_ADDRESS.search(text)
    if lost and peer and peer.group(1) == my_address:  # a worker of this very node died
        return (
            f"{me} lost its connection to another worker on its own node, which died (a crash, out of "
            f"memory, killed); its output says why. With --max-restarts the agent restarts the workers from "
            f"the last complete checkpoint; otherwise rerun with --resume auto."
        )
    if lost and peer:
        return _lost_message(text, me, peer.group(1), nodes)
    return _timeout_message(me, my_address, timeout_s, nodes, net)


@contextlib.contextmanager
def explain_peer_failures(env: LaunchEnv, timeout_s: float) -> Iterator[None]:
    """Re-raise a collective failure caused by another node as a PeerFailure that names the node."""
    try:
        yield
    except RuntimeError as e:
        message = explain(e, env, timeout_s)
        if message is None:
            raise
        raise PeerFailure(message) from None
