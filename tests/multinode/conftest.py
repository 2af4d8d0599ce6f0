"""Fixtures of the multi-node tests: namespace hosts (root and `ip netns` needed, else the tests
skip with the reason) and the prepared corpus they train on."""

from __future__ import annotations

import signal

import pytest

from multinode.hosts import NetnsHosts, unavailable_reason


@pytest.fixture
def make_hosts():
    """make_hosts(n) -> NetnsHosts with n hosts, removed after the test whatever happens."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made: list[NetnsHosts] = []
    # SIGTERM (a CI time-out) becomes KeyboardInterrupt so that the teardown below still runs.
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    def make(n: int = 2) -> NetnsHosts:
        hosts = NetnsHosts(n).__enter__()
        made.append(hosts)
        return hosts

    try:
        yield make
    finally:
        for hosts in made:
            hosts.close()
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
