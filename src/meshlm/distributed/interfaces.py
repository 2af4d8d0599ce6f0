"""The network interfaces of this node, and the one gloo or NCCL will use for the collectives.

Across nodes the collectives connect to the address each rank advertises, so it must be an
address the other nodes can reach. gloo takes it from GLOO_SOCKET_IFNAME, or else from the
hostname (the first address it resolves to that can be bound here, falling back to the
loopback address): on many machines the hostname resolves to 127.0.1.1 or to an address of
another network, the classic cause of multi-node jobs that hang at start. NCCL takes
NCCL_SOCKET_IFNAME, or else prefers InfiniBand (ib*) and then any interface but lo and docker*.
This module reproduces those rules so that `meshlm doctor` can say what will happen before a
job starts, and so that a failed collective can name the node behind an address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

from meshlm.distributed.env import NetworkEnv

_SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


@dataclass(frozen=True)
class Interface:
    name: str
    address: str  # IPv4 address, "" when the interface has none
    up: bool
    loopback: bool


@dataclass(frozen=True)
class InterfaceChoice:
    """The interface the collectives of `backend` will bind to, why, and what is wrong with it
    (None when nothing is)."""

    backend: str
    name: str
    address: str
    how: str
    problem: str | None = None


def list_interfaces() -> list[Interface]:
    """Every interface of this node (its network namespace), with its IPv4 address and state."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)[16:18])[0]
            except OSError:
                continue
            try:
                address = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address
                address = ""
            out.append(Interface(name, address, bool(flags & _IFF_UP), bool(flags & _IFF_LOOPBACK)))
    return out


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def is_local_address(host: str) -> bool:
    """Whether `host` (a name or an address) is one of this node's own addresses."""
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return False
    own = {i.address for i in list_interfaces() if i.address}
    return any(is_loopback(a) or a in own for a in resolved)


def _usable(iface: Interface) -> bool:
    return iface.up and bool(iface.address)


def _describe_all(interfaces: list[Interface]) -> str:
    shown = [f"{i.name} {i.address or '(no IPv4 address)'}{'' if i.up else ' (down)'}" for i in interfaces]
    return ", ".join(shown) or "none"


def _fix_hint(interfaces: list[Interface]) -> str:
    candidates = [i.name for i in interfaces if _usable(i) and not i.loopback]
    return candidates[0] if candidates else "IFACE"


def _named(backend: str, variable: str, value: str, interfaces: list[Interface]) -> InterfaceChoice:
    """The first interface matched by a *_SOCKET_IFNAME value (a comma-separated list; NCCL also
    takes '^' to exclude and '=' for exact names, else prefixes)."""
    exclude = value.startswith("^")
    spec = value.lstrip("^")
    exact = spec.startswith("=")
    names = [n for n in spec.lstrip("=").split(",") if n]

    def matches(iface: Interface) -> bool:
        hit = any(iface.name == n if (exact or backend == "gloo") else iface.name.startswith(n) for n in names)
        return hit != exclude

    chosen = [i for i in interfaces if matches(i)]
    how = f"{variable}={value}"
    if not chosen:
        return InterfaceChoice(
            backend,
            "",
            "",
            how,
            f"{variable}={value} names no interface of this node (its interfaces: {_describe_all(interfaces)}). "
            f"Set {variable} to the interface on the network the nodes share, e.g. {variable}="
            f"{_fix_hint(interfaces)}, on every node.",
        )
    iface = chosen[0]
    problem = None
    if not _usable(iface):
        problem = (
            f"{variable}={value} selects {iface.name}, which is "
            f"{'down' if not iface.up else 'without an IPv4 address'}: the collectives cannot bind to it. "
            f"Bring it up (ip link set {iface.name} up) or choose another interface ({_describe_all(interfaces)})."
        )
    return InterfaceChoice(backend, iface.name, iface.address, how, problem)


def _interface_of(address: str, interfaces: list[Interface]) -> str:
    for i in interfaces:
        if i.address == address:
            return i.name
    return "lo" if is_loopback(address) else "?"


def _gloo_from_hostname(interfaces: list[Interface]) -> InterfaceChoice:
    """gloo without GLOO_SOCKET_IFNAME: the first address the hostname resolves to that can be bound
    here, else the loopback address."""
    hostname = socket.gethostname()
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
        except OSError:
            continue
        address = sockaddr[0]
        return InterfaceChoice(
            "gloo", _interface_of(address, interfaces), address, f"hostname {hostname} resolves to {address}"
        )
    return InterfaceChoice(
        "gloo", "lo", "127.0.0.1", f"hostname {hostname} resolves to no address of this node: loopback fallback"
    )


def _nccl_default(interfaces: list[Interface]) -> InterfaceChoice:
    usable = [i for i in interfaces if _usable(i)]
    for group in (
        [i for i in usable if i.name.startswith("ib")],
        [i for i in usable if not i.loopback and not i.name.startswith("docker")],
        [i for i in usable if i.loopback],
    ):
        if group:
            return InterfaceChoice("nccl", group[0].name, group[0].address, "NCCL's default order (ib*, others, lo)")
    return InterfaceChoice("nccl", "", "", "NCCL's default order", "this node has no interface with an IPv4 address.")


def collective_interface(backend: str, net: NetworkEnv, multi_node: bool = True) -> InterfaceChoice:
    """The interface and address the collectives of `backend` ("gloo" or "nccl") will use here.
    With `multi_node`, a loopback choice is a problem: no other node can connect to it."""
    interfaces = list_interfaces()
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    value = net.nccl_ifname if backend == "nccl" else net.gloo_ifname
    if value:
        choice = _named(backend, variable, value, interfaces)
    elif backend == "nccl":
        choice = _nccl_default(interfaces)
    else:
        choice = _gloo_from_hostname(interfaces)
    if choice.problem is None and multi_node and is_loopback(choice.address):
        choice = InterfaceChoice(
            choice.backend,
            choice.name,
            choice.address,
            choice.how,
            f"{backend} would advertise {choice.address} ({choice.how}), a loopback address: the other nodes "
            f"cannot connect to it and the job would hang at its first collective. Set {variable}="
            f"{_fix_hint(interfaces)} (the interface on the network the nodes share; here: "
            f"{_describe_all(interfaces)}) on every node.",
        )
    return choice
