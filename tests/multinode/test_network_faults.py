"""Network faults between two hosts: packet loss costs time, never exactness; a partition stops
the job within train.collective_timeout_s with an error naming the node that does not answer.

Packet loss comes from nftables inside host 1 (`numgen random mod 1000 < 20 drop`: 2% of its
packets in and out, at random); TCP retransmits them. The partition takes host 1's switch port
down (the cable pulled): no reset, no error from the kernel, only silence, which only a
time-out can turn into an error.
"""

from __future__ import annotations

import shutil
import time

import pytest

from multinode.cases import BASE, assert_same_losses, single_process
from multinode.jobs import Job, logged_steps, sets, wait_for_step


@pytest.fixture(scope="module")
def overrides(prepare_corpus):
    return BASE + [f'data.cache_dir="{prepare_corpus(BASE)}"']


def test_packet_loss_trains_exactly(overrides, make_hosts, tmp_path):
    if shutil.which("nft") is None:
        pytest.skip("packet loss needs nftables (Debian's nftables package; .ci/run installs it)")
    layout = ["parallel.dp=2"]
    ref_losses, _, _ = single_process(overrides, tmp_path / "single")
    hosts = make_hosts(2)
    hosts.drop_packets(1, percent=2)
    run = tmp_path / "run"
    job = Job(hosts, tmp_path, ["train", *sets(overrides + layout), "--out", str(run)])
    assert job.start().wait(timeout=240) == {0: 0, 1: 0}, job.all_logs()
    assert hosts.dropped_packets(1) > 0, "the drop rules dropped nothing: the fault was not injected"
    assert_same_losses([r["loss"] for r in logged_steps(run)], ref_losses, "under 2% packet loss")


def test_partition_names_the_unreachable_node_within_the_time_out(overrides, make_hosts, tmp_path):
    timeout_s = 10
    settings = ["parallel.dp=2", "train.steps=100000", "train.eval_every=0", f"train.collective_timeout_s={timeout_s}"]
    hosts = make_hosts(2)
    run = tmp_path / "run"
    job = Job(hosts, tmp_path, ["train", *sets(overrides + settings), "--out", str(run)])
    job.start()
    wait_for_step(run, 3, job)
    hosts.partition(1)
    cut = time.monotonic()
    assert job.wait(timeout=timeout_s + 60, hosts=[0])[0] != 0
    took = time.monotonic() - cut
    assert took < timeout_s + 30, f"host 0 took {took:.0f} s to stop after the partition"
    log = job.log(0)
    assert "node 1 at 10.77.0.2" in log and "does not answer on the network" in log, log[-4000:]
    assert f"train.collective_timeout_s (now {timeout_s} s)" in log
    assert "Traceback" not in log.split("meshlm: error:")[0].split("rank 0: params")[-1]
    # The cut-off side says the same about the node it cannot reach (then its agent waits for the
    # store, which is torchrun's business: the fixture removes the host).
    deadline = time.monotonic() + 30
    while "does not answer" not in job.log(1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "10.77.0.1" in job.log(1) and "does not answer on the network" in job.log(1), job.log(1)[-3000:]
    assert len(logged_steps(run)) >= 3
