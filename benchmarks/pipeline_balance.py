"""Pipeline stages balanced by count against balanced by measured cost (`parallel.pp_split`),
on a model with uneven blocks (CPU, gloo, 2 pipeline ranks, 1F1B).

The model is tests/uneven_family.py's: a llama whose first blocks have a feed-forward layer
several times wider, while its spec describes every block alike, so "auto" cuts by layer
count. "measured" times every block's forward + backward first (parallel/block_timing.py) and
cuts where those times balance. For each split: the median step time over alternating rounds,
the Gantt chart of one step (docs/img/pipeline_split_{auto,measured}.png), and the measured
bubble (the share of the ranks' time not spent in a stage action) against the schedule's
theoretical bubble with equal stages, (p - 1) / (m + p - 1).

    python benchmarks/pipeline_balance.py [--rounds 3 --steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PP, MICRO, SEQ, SCHEDULE = 2, 8, 64, "1f1b"


def config():
    import uneven_family

    from meshlm.config import Config

    cfg = Config()
    cfg.model = uneven_family.UnevenConfig(
        d_model=256, n_layers=8, n_heads=8, vocab_size=512, max_seq_len=SEQ, wide_blocks=[0, 1, 2], wide_factor=4
    )
    cfg.train.micro_batch = 1
    cfg.data.seq_len = SEQ
    return cfg


def rank_body(rank: int, rounds: int, steps: int, figures: str) -> dict:
    import torch

    from meshlm.model.loss import lm_loss
    from meshlm.model.registry import build_model
    from meshlm.parallel.block_timing import agreed_stage_costs, measure_stage_costs, stage_seconds
    from meshlm.parallel.pipeline import build_schedule, pipeline_step, plot_pipeline_timeline, record_schedule_timeline
    from meshlm.parallel.pipeline_split import build_stage_module, stage_ids_for_rank, stage_layer_counts

    cfg = config()
    model = build_model(cfg.model, seed=0)
    costs = agreed_stage_costs(measure_stage_costs(model, 1, SEQ, torch.device("cpu")), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ), generator=g)
    runs = {}
    for split in ("auto", "measured"):
        cfg.parallel.pp_split = split
        counts = stage_layer_counts(cfg, PP, costs)
        ids = stage_ids_for_rank(rank, PP, SCHEDULE, 1)
        modules = [build_stage_module(model, s, PP, counts) for s in ids]
        schedule = build_schedule(modules, ids, PP, None, "cpu", MICRO, SCHEDULE, lm_loss)
        pipeline_step(schedule, ids, PP, None, x, y)  # infers shapes
        with record_schedule_timeline(schedule) as timeline:
            pipeline_step(schedule, ids, PP, None, x, y)
        events = timeline.gather(None)
        runs[split] = (counts, schedule, ids, modules, events)
    times: dict[str, list[float]] = {"auto": [], "measured": []}
    for _ in range(rounds):
        for split in ("auto", "measured"):
            _, schedule, ids, modules, _ = runs[split]
            for _ in range(steps):
                torch.distributed.barrier()
                started = time.perf_counter()
                pipeline_step(schedule, ids, PP, None, x, y)
                times[split].append(time.perf_counter() - started)
                for m in modules:
                    m.zero_grad(set_to_none=True)
    out = {"costs": costs, "splits": {}}
    for split, (counts, _, _, _, events) in runs.items():
        start = min(e.start for ev in events for e in ev)
        span = max(e.end for ev in events for e in ev) - start
        busy = sum(e.end - e.start for ev in events for e in ev)
        out["splits"][split] = {
            "counts": counts,
            "stage_us": stage_seconds(costs, counts),
            "step_s": statistics.median(times[split]),
            "bubble": 1 - busy / (PP * span),
        }
        if rank == 0 and figures:
            plot_pipeline_timeline(
                events,
                os.path.join(figures, f"pipeline_split_{split}.png"),
                title=f'pp_split="{split}": layers per stage {counts} (blocks 0-2 are 4x wider)',
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--figures", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from meshlm.distributed.spawn import run_distributed

    result = run_distributed(rank_body, PP, args.rounds, args.steps, args.figures, timeout=3000)[0]
    costs = result["costs"]
    print("measured ms (forward + backward, one micro-batch): first", f"{costs.first / 1e3:.1f},")
    print("  blocks", ", ".join(f"{b / 1e3:.1f}" for b in costs.blocks), f"; last {costs.last / 1e3:.1f}")
    theory = (PP - 1) / (MICRO + PP - 1)
    print(f"1F1B, pp {PP}, {MICRO} micro-batches: theoretical bubble with equal stages {theory:.0%}")
    print("| pp_split | layers per stage | stage times (ms, measured costs) | step (ms) | measured bubble |")
    print("|---|---|---|---:|---:|")
    for split, r in result["splits"].items():
        stages = ", ".join(f"{t / 1e3:.0f}" for t in r["stage_us"])
        print(f"| {split} | {r['counts']} | {stages} | {r['step_s'] * 1e3:.0f} | {r['bubble']:.0%} |")
    auto, measured = result["splits"]["auto"]["step_s"], result["splits"]["measured"]["step_s"]
    print(f"measured / auto step time: {measured / auto:.2f}")


if __name__ == "__main__":
    main()
