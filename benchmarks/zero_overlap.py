"""Exposed communication of ZeRO-1/2 at dp 2 (CPU, gloo): reduce-scatter after the backward
against reduce-scatter overlapped with it.

Per step, on each of the 2 ranks (the larger of the two counts):
  backward     the last micro-batch's loss.backward() (with the overlap, buckets are launched
               from inside it)
  reduce       ZeroOptimizer.reduce_gradients(): the exposed reduce-scatter (all of it without
               the overlap; what is left to wait for with it)
  update       ZeroOptimizer.step(): AdamW on the shard and the parameter all-gather
  step         the whole step
Medians over the steps after 2 warm-up steps, then medians over alternating rounds (the machine
is shared and noisy). A ~25M-parameter llama (the predict benchmark's), 2 micro-batches of
2 x 64 tokens per rank, the default 25 MiB buckets, 1 thread per rank. Several source trees
side by side (a tree without `overlap_backward` reduces after the backward):

    python benchmarks/zero_overlap.py --rounds 3 --tree before=/path/to/old/src --tree after=src
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

STEPS, WARMUP, MICRO, ACCUM, SEQ = 8, 2, 2, 2, 64


def rank_body(rank: int, stage: int) -> dict:
    import torch
    import torch.distributed as dist

    from meshlm.config import TrainConfig
    from meshlm.model.loss import lm_loss
    from meshlm.model.registry import build_model
    from meshlm.model.transformer.config import TransformerConfig
    from meshlm.parallel.zero import ZeroOptimizer

    cfg = TransformerConfig(arch="llama", d_model=512, n_layers=6, n_heads=8, vocab_size=6144, max_seq_len=512)
    model = build_model(cfg, seed=0)
    group = dist.new_group([0, 1])
    opt = ZeroOptimizer(model, group, stage, TrainConfig(lr=1e-3))
    overlap = getattr(opt, "overlap_backward", None)
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {k: [] for k in ("backward", "reduce", "update", "step")}
    for step in range(STEPS):
        dist.barrier(group)
        start = time.perf_counter()
        for micro in range(ACCUM):
            x = torch.randint(0, cfg.vocab_size, (MICRO, SEQ + 1), generator=g)
            loss = lm_loss(model(x[:, :-1]), x[:, 1:]) / ACCUM
            last = micro == ACCUM - 1
            t0 = time.perf_counter()
            with overlap() if overlap is not None and last else contextlib.nullcontext():
                loss.backward()
            backward = time.perf_counter() - t0
        t1 = time.perf_counter()
        opt.reduce_gradients()
        t2 = time.perf_counter()
        opt.step(1e-3)
        opt.zero_grad()
        t3 = time.perf_counter()
        if step >= WARMUP:
            for key, value in (("backward", backward), ("reduce", t2 - t1), ("update", t3 - t2), ("step", t3 - start)):
                times[key].append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def worker(stage: int) -> None:
    from meshlm.distributed.spawn import run_distributed

    per_rank = run_distributed(rank_body, 2, stage, timeout=3000)
    print(json.dumps({key: max(r[key] for r in per_rank) for key in per_rank[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--worker-stage", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_stage is not None:
        worker(args.worker_stage)
        return
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": "src"}
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for stage in (1, 2):
            for tree, src in trees.items():
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(src)}
                cmd = [sys.executable, os.path.abspath(__file__), "--worker-stage", str(stage)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault((tree, stage), []).append(got)
                print(
                    f"round {r + 1} zero{stage} {tree}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in got.items())
                )
    print(f"\nmedians of {args.rounds} round(s), ms per step (max over the 2 ranks)")
    print("| ZeRO | tree | backward | exposed reduce-scatter | update + all-gather | step |")
    print("|---|---|---:|---:|---:|---:|")
    for (tree, stage), runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) * 1e3 for k in runs[0]}
        print(
            f"| {stage} | {tree} | {med['backward']:.0f} | {med['reduce']:.0f} | {med['update']:.0f} | {med['step']:.0f} |"
        )


if __name__ == "__main__":
    main()
