"""Train a config on 1 process (in this one) or on dp forked ranks and return the summed step
times from its metrics.jsonl: the fitting time the classical-model benchmarks compare against
scikit-learn and hmmlearn, without start-up, data loading or the final export."""

from __future__ import annotations

from pathlib import Path

from meshlm.distributed.spawn import run_distributed
from meshlm.train.metrics import read_metrics
from meshlm.train.trainer import train


def quiet(*args, **kwargs) -> None:
    pass


def _train_rank(rank, cfg, out):
    train(cfg, out, log=quiet)


def run_meshlm(cfg, dp: int, out: Path, timeout: float = 3600.0) -> float:
    """Seconds of training steps (the sum of the run's step_time_s)."""
    if dp == 1:
        train(cfg, out, overwrite=True, log=quiet)
    else:
        run_distributed(_train_rank, dp, cfg, out, timeout=timeout)
    return sum(r["step_time_s"] for r in read_metrics(out / "metrics.jsonl") if "step_time_s" in r)
