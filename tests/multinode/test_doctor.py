"""`meshlm doctor` on two namespace hosts: all well, then one injected fault per run (a wrong
endpoint, another meshlm version with another config, an interface the other node cannot
reach), each reported on the nodes as one paragraph naming the node and the fix."""

from __future__ import annotations

import shutil
import sys

from meshlm.distributed.doctor import compare
from meshlm.distributed.doctor_facts import NodeFacts
from multinode.hosts import NetnsHosts
from multinode.jobs import SRC, node_env

ENDPOINT = "10.77.0.1:29400"


def _doctors(hosts: NetnsHosts, tmp_path, name, args=([], []), envs=({}, {}), timeout=60):
    """Run `meshlm doctor` on both hosts at once; returns ([exit codes], [outputs]). Where both
    nodes join, the doctors finish as soon as they have compared notes, whatever `timeout`."""
    procs = []
    for host in range(2):
        argv = [sys.executable, "-m", "meshlm", "doctor", "--nnodes", "2", "--timeout", str(timeout), *args[host]]
        if not any(a.startswith("--rdzv") for a in args[host]):
            argv += ["--rdzv", ENDPOINT]
        procs.append(hosts.start(host, argv, tmp_path / f"{name}-{host}.log", env=node_env(**envs[host])))
    codes = [p.wait(timeout + 60) for p in procs]
    return codes, [(tmp_path / f"{name}-{host}.log").read_text() for host in range(2)]


def test_doctor_passes_then_finds_each_injected_fault(make_hosts, tmp_path):
    hosts = make_hosts(2)

    codes, out = _doctors(hosts, tmp_path, "ok")
    assert codes == [0, 0], out
    for text in out:
        assert "nodes (2 of 2)" in text and "ok: every check passed" in text
        assert "gloo interface eth0 10.77.0.1" in out[0] and "10.77.0.2 (host" in text
    assert "served by this node (port 29400 is free)" in out[0] and "rendezvous 10.77.0.1:29400: answers" in out[1]

    # A wrong endpoint on host 1 (the right host, another port): refused there; host 0 waits alone.
    codes, out = _doctors(hosts, tmp_path, "endpoint", args=([], ["--rdzv", "10.77.0.1:29401"]), timeout=5)
    assert codes == [1, 1], out
    assert "10.77.0.1:29401 refuses connections" in out[1] and "same --rdzv HOST:PORT" in out[1]
    assert "only 1 of 2 nodes joined" in out[0]

    # Host 1 runs another meshlm (a copy of the package installed as version 0.0.1) and another config.
    other = tmp_path / "other-install"
    shutil.copytree(SRC / "meshlm", other / "meshlm", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "meshlm" / "_local_patch.py").write_text("# a local edit\n")
    (other / "meshlm-0.0.1.dist-info").mkdir()
    (other / "meshlm-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: meshlm\nVersion: 0.0.1\n")
    codes, out = _doctors(
        hosts, tmp_path, "version", args=([], ["--set", "train.lr=0.01"]), envs=({}, {"PYTHONPATH": str(other)})
    )
    assert codes == [1, 1], out
    for text in out:
        assert "the nodes run different meshlm" in text and "meshlm 0.0.1" in text and str(other) in text
        assert "train.lr is 0.003 on 10.77.0.1 (host" in text and "0.01 on 10.77.0.2" in text
        assert "same --config file and the same --set overrides" in text

    # Host 1 without GLOO_SOCKET_IFNAME: gloo would take the hostname's address, loopback here.
    codes, out = _doctors(hosts, tmp_path, "interface", envs=({}, {"GLOO_SOCKET_IFNAME": ""}))
    assert codes == [1, 1], out
    assert "gloo would advertise 127.0.0.1" in out[1] and "Set GLOO_SOCKET_IFNAME=eth0" in out[1]
    assert "node 10.77.0.1 (host" in out[0] and "cannot reach node 127.0.0.1" in out[0]


def _facts(address, **changes) -> NodeFacts:
    base = dict(
        hostname="n",
        meshlm_version="0.1.0",
        code_hash="c",
        code_path="/x",
        torch_version="2.13.0",
        python_version="3.11",
        device="cpu",
        backend="gloo",
        interface="eth0",
        address=address,
        interface_how="GLOO_SOCKET_IFNAME=eth0",
        interface_problem=None,
        config_hash="h",
        config={"train": {"lr": 0.003}},
        data_dir="/data",
        data_source="python-stdlib-3.11",
        data_fingerprint="d1",
    )
    return NodeFacts(**{**base, **changes})


def test_doctor_compares_data_and_backends():
    same = [_facts("10.0.0.1"), _facts("10.0.0.2")]
    assert compare(same, {0: [(1, True, "1 ms")], 1: [(0, True, "1 ms")]}) == ([], [])
    problems, _ = compare([_facts("10.0.0.1"), _facts("10.0.0.2", data_fingerprint="d2")], {})
    assert len(problems) == 1 and "the prepared data differs" in problems[0] and "d2 (/data) on 10.0.0.2" in problems[0]
    problems, notes = compare([_facts("10.0.0.1"), _facts("10.0.0.2", data_fingerprint="")], {})
    assert problems == [] and "not prepared on 10.0.0.2" in notes[0]
    problems, _ = compare(
        [
            _facts("10.0.0.1", data_fingerprint=""),
            _facts("10.0.0.2", data_fingerprint="", data_source="python-stdlib-3.12"),
        ],
        {},
    )
    assert "different sources" in problems[0] and "python-stdlib-3.12 on 10.0.0.2" in problems[0]
    problems, _ = compare([_facts("10.0.0.1", backend="nccl", device="cuda x8 (H100)"), _facts("10.0.0.2")], {})
    assert "different backends" in problems[0] and "nccl on cuda x8 (H100) on 10.0.0.1" in problems[0]
