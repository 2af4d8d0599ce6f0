"""Losing a whole host (its agent and all of its workers killed at once) in the middle of training.

With --max-restarts and --resume auto on every node, the surviving agent restarts its workers
when the lost node's agent is started again, every worker resumes from the newest complete
checkpoint, and the losses of the whole run equal the uninterrupted single-process run. A node
that never comes back ends the job (after --rdzv-conf join_timeout) with a message naming it.
"""

from __future__ import annotations

import re
import time

import pytest

from multinode.cases import BASE, assert_same_losses, single_process
from multinode.jobs import Job, logged_steps, sets, wait_for_step

LONG = ["train.steps=30", "train.eval_every=0", "train.checkpoint_every=3", "train.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def overrides(prepare_corpus):
    return BASE + [f'data.cache_dir="{prepare_corpus(BASE)}"'] + LONG


@pytest.mark.slow
def test_lost_host_rejoins_and_training_resumes_exactly(overrides, make_hosts, tmp_path):
    ref_losses, _, _ = single_process(overrides, tmp_path / "single")
    hosts = make_hosts(2)
    run = tmp_path / "run"
    command = ["train", *sets(overrides + ["parallel.dp=2"]), "--out", str(run), "--resume", "auto"]
    job = Job(hosts, tmp_path, command, max_restarts=2, rdzv_conf="join_timeout=120")
    job.start()
    wait_for_step(run, 4, job)  # after the step-3 checkpoint
    hosts.kill_host(1)
    job.start(hosts=[1])  # the node comes back: the same command on the same host
    assert job.wait(timeout=300) == {0: 0, 1: 0}, job.all_logs()
    log = job.log(0)
    assert "lost its connection to node 1 at 10.77.0.2" in log, log[-4000:]
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert resumed and int(resumed[-1]) >= 3, log[-4000:]
    assert_same_losses([r["loss"] for r in logged_steps(run)], ref_losses, "with a host lost and back")


def test_host_that_never_returns_ends_the_job_with_its_name(overrides, make_hosts, tmp_path):
    hosts = make_hosts(2)
    run = tmp_path / "run"
    command = ["train", *sets(overrides + ["parallel.dp=2"]), "--out", str(run), "--resume", "auto"]
    join_timeout = 10
    job = Job(hosts, tmp_path, command, max_restarts=1, rdzv_conf=f"join_timeout={join_timeout}")
    job.start()
    wait_for_step(run, 2, job)
    hosts.kill_host(1)
    killed = time.monotonic()
    assert job.wait(timeout=join_timeout + 120, hosts=[0])[0] != 0
    log = job.log(0)
    assert "lost its connection to node 1 at 10.77.0.2 (host" in log, log[-4000:]
    assert "join_timeout" in log
    assert time.monotonic() - killed < join_timeout + 90
