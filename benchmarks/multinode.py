"""Multi-node costs on namespace hosts (needs root and `ip netns`; nftables for packet loss).

1. Step time of dp2 across 2 hosts (one rank per host, gloo over a veth link through a bridge)
   against dp2 on one host (two ranks in one namespace), and across 2 hosts with packet loss
   on one host (nftables, random drops). The runs alternate, rounds x each; the figure of a
   run is the median step time of its steps after the third; ratios of medians.
2. Time from a node's loss to training resumed: a 2-host job with --max-restarts 1 and
   --resume auto; once step `--kill-at` is logged, every process of host 1 is SIGKILLed and
   its agent started again at once; measured to the first step logged after the resume
   (and, within it, to the surviving rank's error naming the lost node).

Latency is not measured: this machine's kernel has no sch_netem (`tc qdisc ... netem` is
refused), and gloo's ranks connect directly to each other's ephemeral ports, so a user-space
TCP proxy cannot sit between them.

    sudo PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multinode.py --rounds 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the namespace hosts and torchrun jobs of the tests

from multinode.hosts import NetnsHosts, unavailable_reason  # noqa: E402
from multinode.jobs import Job, logged_steps, sets  # noqa: E402

from meshlm.config import load_config  # noqa: E402
from meshlm.data.prepare import prepare_data  # noqa: E402

# tiny-cpu's model (1M-parameter llama: 4 MB of gradients all-reduced per step) on one sequence
# of 128 tokens per rank, so that the step is short and the network's share of it shows.
OVERRIDES = [
    "train.micro_batch=1",
    "train.global_batch=2",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
    "parallel.dp=2",
]


def _median_step(run: Path) -> float:
    times = [r["step_time_s"] for r in logged_steps(run)][3:]
    return statistics.median(times)


def _run(case: str, steps: int, loss_percent: float, work: Path, overrides: list[str]) -> float:
    two = case != "one host"
    with NetnsHosts(2 if two else 1) as hosts:
        if case == "two hosts + loss":
            hosts.drop_packets(1, loss_percent)
        run = work / f"run-{time.monotonic_ns()}"
        command = ["train", *sets(overrides + [f"train.steps={steps}"]), "--out", str(run)]
        job = Job(hosts, work, command, nnodes=2 if two else 1, nproc_per_node=1 if two else 2, name="bench")
        codes = job.start().wait(timeout=900)
        if any(codes.values()):
            raise SystemExit(f"{case}: the job failed\n{job.all_logs()}")
        dropped = hosts.dropped_packets(1) if case == "two hosts + loss" else 0
    step = _median_step(run)
    print(f"  {case}: median step {step * 1000:.1f} ms" + (f" ({dropped} packets dropped)" if dropped else ""))
    return step


def _node_loss(kill_at: int, work: Path, overrides: list[str]) -> dict[str, float]:
    every = 5
    settings = overrides + ["train.steps=200", f"train.checkpoint_every={every}", "train.keep_checkpoints=0"]
    with NetnsHosts(2) as hosts:
        run = work / f"loss-{time.monotonic_ns()}"
        command = ["train", *sets(settings), "--out", str(run), "--resume", "auto"]
        job = Job(hosts, work, command, max_restarts=1, rdzv_conf="join_timeout=300", name="loss")
        job.start()
        while not any(r["step"] >= kill_at for r in logged_steps(run)):
            time.sleep(0.02)
        checkpoint = (max(r["step"] for r in logged_steps(run)) // every) * every
        killed = time.monotonic()
        hosts.kill_host(1)
        job.start(hosts=[1])
        detected = resumed = None
        truncated = False
        while resumed is None:
            now = time.monotonic()
            if detected is None and "lost its connection to node 1" in job.log(0):
                detected = now
            steps = [r["step"] for r in logged_steps(run)]
            truncated = truncated or (steps and max(steps) <= checkpoint)
            if truncated and steps and max(steps) > checkpoint:
                resumed = now
            if now - killed > 600:
                raise SystemExit("training did not resume within 600 s\n" + job.all_logs())
            time.sleep(0.02)
        hosts.close()
    out = {"detected_s": (detected or resumed) - killed, "resumed_s": resumed - killed}
    print(
        f"  node loss: error naming the node after {out['detected_s']:.1f} s, training resumed after {out['resumed_s']:.1f} s"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--loss", type=float, default=1.0, help="packet loss on host 1, percent")
    parser.add_argument("--kill-at", type=int, default=8)
    parser.add_argument("--loss-rounds", type=int, default=2, help="node-loss measurements")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot build namespace hosts: {reason}")
    work = Path(tempfile.mkdtemp(prefix="meshlm-multinode-"))
    overrides = OVERRIDES + [f'data.cache_dir="{work / "cache"}"']
    cfg = load_config(None, overrides)
    prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None)

    cases = ["one host", "two hosts", "two hosts + loss"]
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}")
        for i in range(len(cases)):  # rotate the order every round
            case = cases[(i + r) % len(cases)]
            times[case].append(_run(case, args.steps, args.loss, work, overrides))
    losses = [_node_loss(args.kill_at, work, overrides) for _ in range(args.loss_rounds)]

    med = {c: statistics.median(v) for c, v in times.items()}
    result = {
        "median_step_ms": {c: round(v * 1000, 1) for c, v in med.items()},
        "ratio_two_hosts_vs_one": round(med["two hosts"] / med["one host"], 3),
        "ratio_loss_vs_two_hosts": round(med["two hosts + loss"] / med["two hosts"], 3),
        "packet_loss_percent": args.loss,
        "node_loss": losses,
    }
    print(json.dumps(result, indent=2))
    print()
    print("| case | median step (ms) | ratio |")
    print("|---|---|---|")
    print(f"| dp2 on one host (2 ranks) | {med['one host'] * 1000:.1f} | 1.00 |")
    print(f"| dp2 across 2 hosts | {med['two hosts'] * 1000:.1f} | {result['ratio_two_hosts_vs_one']:.2f} |")
    print(
        f"| dp2 across 2 hosts, {args.loss:g}% packet loss | {med['two hosts + loss'] * 1000:.1f} | "
        f"{med['two hosts + loss'] / med['one host']:.2f} |"
    )
    for i, loss in enumerate(losses, start=1):
        print(
            f"node loss {i}: error after {loss['detected_s']:.1f} s, training resumed after {loss['resumed_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
