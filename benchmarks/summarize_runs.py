"""Print median throughput figures of finished runs: `python benchmarks/summarize_runs.py RUN_DIR...`.

MFU uses the peak dense bf16 rate given with --peak-tflops (H100 SXM: 989)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    args = parser.parse_args()
    print("| run | steps | median tokens/s | median step (s) | TFLOP/s | MFU | final loss | val loss |")
    print("|---|---|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r][args.skip :]
        evals = [r for r in records if "val_loss" in r]
        tok = statistics.median(r["tokens_per_s"] for r in steps)
        tfl = statistics.median(r["tflops"] for r in steps)
        st = statistics.median(r["step_time_s"] for r in steps)
        val = f"{evals[-1]['val_loss']:.3f}" if evals else "-"
        print(
            f"| {run.name} | {len(steps) + args.skip} | {tok:,.0f} | {st:.3f} | {tfl:.1f} | {100 * tfl / args.peak_tflops:.1f}% "
            f"| {steps[-1]['loss']:.3f} | {val} |"
        )


if __name__ == "__main__":
    main()
