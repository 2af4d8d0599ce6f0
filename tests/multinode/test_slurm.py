"""examples/slurm/train.sbatch end to end on a one-machine Slurm cluster (Debian's slurmctld,
slurmd and munge) inside a namespace host: sbatch runs `meshlm doctor` and then torchrun on the
allocation, and the job trains what one process trains.

The cluster lives in the test's own network namespace (its ports and daemons are private to
it; the fixture kills them with the host). `ip netns exec` gives every command a fresh /sys,
so slurmd gets the cgroup v1 hierarchies mounted again in its own mount namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multinode.cases import BASE, assert_same_losses, single_process
from multinode.jobs import SRC, logged_steps, node_env, sets

SBATCH = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train.sbatch"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo")
CGROUPS = "freezer cpuset memory devices cpu cpuacct pids"


def test_sbatch_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0


def _slurm_conf(tmp: Path, address: str) -> Path:
    for d in ("state", "spool", "munge"):
        (tmp / d).mkdir(parents=True)
    conf = tmp / "slurm.conf"
    conf.write_text(
        f"""ClusterName=meshlmtest
SlurmctldHost={os.uname().nodename}({address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={tmp}/munge/munge.socket.2
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName={os.uname().nodename} NodeAddr={address} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={os.uname().nodename} Default=YES MaxTime=INFINITE State=UP
"""
    )
    (tmp / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    return conf


@pytest.mark.slow
def test_sbatch_trains_on_a_one_machine_slurm_cluster(make_hosts, prepare_corpus, tmp_path):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing or not Path("/etc/munge/munge.key").is_file():
        pytest.skip(
            f"Debian's slurmctld, slurmd, slurm-client and munge are needed (missing: {missing or 'munge.key'})"
        )
    overrides = BASE + [f'data.cache_dir="{prepare_corpus(BASE)}"']
    ref_losses, _, _ = single_process(overrides, tmp_path / "single")

    hosts = make_hosts(1)
    conf = _slurm_conf(tmp_path / "slurm", hosts.addrs[0])
    env = node_env(SLURM_CONF=str(conf), PYTHON=sys.executable)
    env["PYTHONPATH"] = str(SRC)
    env["NPROC_PER_NODE"] = "2"
    slurm = tmp_path / "slurm"

    def sh(command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return hosts.run(0, ["sh", "-c", command], env=env, timeout=timeout)

    assert (
        sh(
            f"munged --socket={slurm}/munge/munge.socket.2 --pid-file={slurm}/munge/munged.pid "
            f"--log-file={slurm}/munge/munged.log --seed-file={slurm}/munge/seed -f"
        ).returncode
        == 0
    )
    assert sh(f"slurmctld -f {conf}").returncode == 0
    mounts = " && ".join(
        f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} none /sys/fs/cgroup/{c}" for c in CGROUPS.split()
    )
    started = sh(f"mount -t tmpfs none /sys/fs/cgroup && {mounts} && slurmd -f {conf}")
    assert started.returncode == 0, started.stderr + (slurm / "slurmd.log").read_text()[-3000:]
    deadline = time.monotonic() + 60
    while "idle" not in sh("sinfo -h -o %T").stdout:
        assert time.monotonic() < deadline, (slurm / "slurmctld.log").read_text()[-3000:]
        time.sleep(0.5)

    run = tmp_path / "run"
    train_args = sets(overrides + ["parallel.dp=2"]) + ["--out", str(run)]
    job = sh(
        f"sbatch --nodes 1 --wait --output {slurm}/job.out {SBATCH} " + " ".join(f"'{a}'" for a in train_args),
        timeout=600,
    )
    output = (slurm / "job.out").read_text() if (slurm / "job.out").is_file() else ""
    assert job.returncode == 0, job.stdout + job.stderr + output[-4000:]
    assert "1 node(s) x 2 worker(s), rendezvous" in output
    assert "ok: every check passed" in output  # the doctor ran on the allocation first
    assert_same_losses([r["loss"] for r in logged_steps(run)], ref_losses, "under Slurm")
