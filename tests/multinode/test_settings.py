"""The pieces of the multi-node path that need no second host: the time-out setting, the
interface choice, and the reachability probe (on this machine's own loopback)."""

from __future__ import annotations

import socket

import pytest

from meshlm.config import ConfigError, load_config
from meshlm.distributed.env import NetworkEnv
from meshlm.distributed.interfaces import collective_interface, list_interfaces
from meshlm.distributed.peer_errors import answers


def test_collective_timeout_is_validated():
    assert load_config(None, ["train.collective_timeout_s=30"]).train.collective_timeout_s == 30.0
    with pytest.raises(ConfigError, match="'train.collective_timeout_s' must be a positive number of seconds"):
        load_config(None, ["train.collective_timeout_s=0"])
    with pytest.raises(ConfigError, match="expects a number"):
        load_config(None, ['train.collective_timeout_s="soon"'])


def _net(gloo="", nccl=""):
    return NetworkEnv(gloo_ifname=gloo, nccl_ifname=nccl, master_addr="", master_port=0, node_rank=-1)


def test_interface_choice_follows_the_variables():
    names = [i.name for i in list_interfaces()]
    assert "lo" in names
    missing = collective_interface("gloo", _net(gloo="nosuch0"))
    assert missing.problem and "GLOO_SOCKET_IFNAME=nosuch0 names no interface" in missing.problem
    lo = collective_interface("gloo", _net(gloo="lo"), multi_node=True)
    assert lo.address == "127.0.0.1" and "a loopback address" in lo.problem
    assert collective_interface("gloo", _net(gloo="lo"), multi_node=False).problem is None
    excluded = collective_interface("nccl", _net(nccl="^lo"))
    assert excluded.name != "lo"


def test_probe_tells_refused_from_silent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert answers("127.0.0.1", port) == (True, "answers (connection refused)")
        s.listen()
        assert answers("127.0.0.1", port)[0]
