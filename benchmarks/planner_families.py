"""How close the planner comes for families other than the transformer (planned from their spec).

python benchmarks/planner_families.py [--configs maxent-tiny hmm-tiny] [--steps 6] [--rounds 1]

For each config, a few layouts of 1-2 processes (what this 2-core machine can run side by side):
the planner's predicted step time (`meshlm plan --layout ...`) against the step time measured by
training that layout for a few steps through `meshlm train --nproc N` (plan/measure.py, the
path `--measure-top` uses; median of the steps after the first). With --rounds > 1 the layouts
alternate and each keeps the median of its rounds. Prints a Markdown table, Spearman and regret.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from meshlm.config import load_config
from meshlm.plan import make_cluster
from meshlm.plan.api import plan
from meshlm.plan.layout import Workload, parse_layout
from meshlm.plan.measure import measure_candidates, regret, spearman

LAYOUTS = ["dp=1", "dp=2", "dp=2,zero=1", "dp=2,zero=3", "tp=2", "dp=1,recompute=full"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["maxent-tiny", "hmm-tiny"])
    p.add_argument("--layouts", nargs="+", default=LAYOUTS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()
    cluster2 = make_cluster("cpu-local", None, 2, log=lambda m: print(m, file=sys.stderr))
    for name in args.configs:
        cfg = load_config(name, ["data.max_bytes=2000000", "train.eval_every=0", "train.sample_tokens=0"])
        workload = Workload(cfg.model, cfg.train.global_batch, cfg.data.seq_len)
        rows = []
        for text in args.layouts:
            world = 1 if text in ("dp=1",) or text.startswith("dp=1,") else 2
            cluster = cluster2 if world == 2 else make_cluster("cpu-local", None, 1)
            layout = parse_layout(f"{text},micro_batch={args.micro_batch}", world)
            est = plan(workload, cluster, layout=layout, config=cfg).candidates[0]
            rows.append((text, est))
        runs: dict[str, list[float]] = {text: [] for text, _ in rows}
        for r in range(args.rounds):
            order = rows[r % len(rows) :] + rows[: r % len(rows)]
            for text, est in order:
                cfg.train.global_batch = workload.global_batch
                m = measure_candidates(cfg, workload, [est], 1, args.steps, log=lambda s: print(s, file=sys.stderr))[0]
                if m.step_time_s is None:
                    print(f"{name} {text}: failed: {m.error}", file=sys.stderr)
                else:
                    runs[text].append(m.step_time_s)
        print(
            f"\n### {name}: {cfg.model.family}, global batch {workload.global_batch} x {workload.seq_len}, "
            f"micro-batch {args.micro_batch}\n"
        )
        print("| layout | predicted step (s) | measured step (s) | error | runs (s) |")
        print("|---|---|---|---|---|")
        pred, meas = [], []
        for text, est in rows:
            if not runs[text]:
                print(f"| {text} | {est.step_time_s:.3f} | failed | | |")
                continue
            med = statistics.median(runs[text])
            pred.append(est.step_time_s)
            meas.append(med)
            err = est.step_time_s / med - 1
            got = ", ".join(f"{t:.3f}" for t in runs[text])
            print(f"| {text} | {est.step_time_s:.3f} | {med:.3f} | {100 * err:+.0f}% | {got} |")
        if len(pred) >= 2:
            print(
                f"\nSpearman {spearman(pred, meas):.2f}, regret {100 * regret(pred, meas):.0f}% over {len(pred)} layouts"
            )


if __name__ == "__main__":
    main()
