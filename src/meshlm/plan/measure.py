"""Measuring the best-predicted layouts: `meshlm plan --measure-top K`, `parallel.auto_measure = K`.

A cost model ranks layouts well, not perfectly; the layouts it puts first are often within a
few percent of each other. As NeMo's auto-configurator and DeepSpeed's autotuner do, the K
best-predicted layouts are then trained for a few real steps on this machine and ranked by
what was measured. Each runs as its own `python -m meshlm train --nproc N` (the launcher users
train with; the planner sits below the trainer and never imports it), with the planned config
and this layout, no evaluation, sample or checkpoint, into a temporary run directory; its step
time is the median of the steps after the first (which builds and warms everything), as the
trainer records them in metrics.jsonl.

The ranking is summarised by the Spearman rank correlation between predicted and measured step
time and by the regret of the planner's first choice: its measured step time over the best
measured, minus 1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from meshlm.config import Config, ConfigError
from meshlm.distributed.env import accelerator, environment_without_launch
from meshlm.plan.cost import Estimate
from meshlm.plan.hardware import CPU_LOCAL, Cluster
from meshlm.plan.layout import Workload, layout_config

DEFAULT_STEPS = 5
RUN_TIMEOUT_S = 1800


@dataclass
class Measured:
    estimate: Estimate
    predicted_rank: int  # 1 = the planner's first choice
    step_time_s: float | None  # None: the run failed (see error)
    error: str = ""

    def to_dict(self) -> dict:
        return {
            **self.estimate.to_dict(),
            "predicted_rank": self.predicted_rank,
            "measured_step_time_s": self.step_time_s,
            "measure_error": self.error,
        }


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); nan for fewer than 2 points."""
    if len(xs) < 2:
        return float("nan")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def regret(predicted: list[float], measured: list[float]) -> float:
    """The measured step time of the predicted-fastest layout over the best measured, minus 1."""
    first = min(range(len(predicted)), key=lambda i: predicted[i])
    return measured[first] / min(measured) - 1


def check_measurable(cluster: Cluster) -> None:
    """Layouts can be timed only on the machine planned for: cpu-local, or one node of the
    accelerators this machine has."""
    if cluster.name == CPU_LOCAL:
        return
    gpus = accelerator()
    if cluster.nodes == 1 and gpus is not None and cluster.devices_per_node <= gpus.count:
        return
    here = f"{gpus.count} x {gpus.name}" if gpus is not None else "no accelerator"
    raise ConfigError(
        f"--measure-top times layouts on this machine ({here}), but the plan is for {cluster.describe()}. "
        f"Plan for --cluster cpu-local (or for this machine's own GPUs, one node), or drop --measure-top."
    )


def measure_candidates(
    base: Config,
    workload: Workload,
    candidates: list[Estimate],
    top: int,
    steps: int = DEFAULT_STEPS,
    log=print,
) -> list[Measured]:
    """Train the `top` best-predicted fitting candidates for `steps` steps each (see the module
    docstring) and return them in predicted order, with their measured step times."""
    if top < 1 or steps < 2:
        raise ConfigError(
            f"measuring needs at least 1 layout and 2 steps (the first only warms up); got {top} layout(s), {steps} step(s)."
        )
    chosen = [(i + 1, e) for i, e in enumerate(candidates) if e.fits and e.meshlm_valid][:top]
    if not chosen:
        raise ConfigError("no layout fits, so none can be measured; see the table above for why.")
    results = []
    with tempfile.TemporaryDirectory(prefix="meshlm-measure-") as tmp:
        for n, (rank, est) in enumerate(chosen, 1):
            world = est.layout.world_size
            log(f"measuring {n}/{len(chosen)}: {est.layout.describe()} ({world} process(es), {steps} steps)...")
            time_s, error = _run(base, workload, est, steps, Path(tmp) / f"layout{n}")
            results.append(Measured(est, rank, time_s, error))
    return results


def _run(base: Config, workload: Workload, est: Estimate, steps: int, work: Path) -> tuple[float | None, str]:
    cfg = layout_config(base, est.layout, workload)
    cfg.parallel = replace(cfg.parallel, auto=False, auto_measure=0)
    cfg.train = replace(
        cfg.train,
        steps=steps,
        log_every=1,
        eval_every=0,
        sample_tokens=0,
        checkpoint_every=0,
        progress=False,
        trace=False,
        profile_comm=False,
    )
    work.mkdir(parents=True)
    (work / "config.toml").write_text(cfg.to_toml())
    cmd = [sys.executable, "-m", "meshlm", "train", "--config", str(work / "config.toml")]
    cmd += ["--nproc", str(est.layout.world_size), "--out", str(work / "run"), "--overwrite"]
    env = environment_without_launch()
    # the training processes import this same meshlm, wherever it was imported from
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {RUN_TIMEOUT_S} s"
    metrics = work / "run" / "metrics.jsonl"
    times = []
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r]
    if proc.returncode != 0 or len(times) < 2:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"exit code {proc.returncode}: " + " / ".join(tail)
    return statistics.median(times[1:]), ""


def summary(results: list[Measured]) -> dict:
    """Spearman, regret and the measured best over the layouts that ran."""
    ok = [r for r in results if r.step_time_s is not None]
    if not ok:
        return {"measured": 0, "spearman": None, "regret": None, "best": None}
    predicted = [r.estimate.step_time_s for r in ok]
    measured = [r.step_time_s for r in ok]
    best = min(ok, key=lambda r: r.step_time_s)
    rho = spearman(predicted, measured)
    return {
        "measured": len(ok),
        "spearman": None if rho != rho else rho,
        "regret": regret(predicted, measured),
        "best": best,
    }


def format_measured(results: list[Measured], steps: int) -> str:
    ok = sorted((r for r in results if r.step_time_s is not None), key=lambda r: r.step_time_s)
    measured_rank = {id(r): i for i, r in enumerate(ok, 1)}
    lines = [
        f"Measured on this machine: {len(results)} layout(s), {steps} steps each through `meshlm train --nproc N`, "
        f"step time = median of steps 2-{steps}:",
        f"{'predicted':>9}  {'measured':>8}  {'predicted s':>11}  {'measured s':>10}  {'error':>6}  layout",
    ]
    for r in results:
        if r.step_time_s is None:
            lines.append(
                f"{r.predicted_rank:>9}  {'-':>8}  {r.estimate.step_time_s:>11.4g}  {'failed':>10}  {'':>6}  "
                f"{r.estimate.layout.describe()}: {r.error}"
            )
            continue
        err = r.estimate.step_time_s / r.step_time_s - 1
        lines.append(
            f"{r.predicted_rank:>9}  {measured_rank[id(r)]:>8}  {r.estimate.step_time_s:>11.4g}  "
            f"{r.step_time_s:>10.4g}  {100 * err:>+5.0f}%  {r.estimate.layout.describe()}"
        )
    s = summary(results)
    if s["best"] is not None:
        first = min((r for r in results if r.step_time_s is not None), key=lambda r: r.predicted_rank)
        rho = "n/a" if s["spearman"] is None else f"{s['spearman']:.2f}"
        lines.append(
            f"Measured best: {s['best'].estimate.layout.describe()} ({s['best'].step_time_s:.4g} s per step); the "
            f"planner's first measured choice ({first.estimate.layout.describe()}) is {100 * s['regret']:.0f}% slower "
            f"(regret); Spearman rank correlation of predicted and measured step time {rho} over {s['measured']} layouts."
        )
    return "\n".join(lines)
