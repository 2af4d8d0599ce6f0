"""The Python API's overhead: `lm.fit(..., workers=N)` against `meshlm train --nproc N`.

Both train the same config (the tiny llama of tests/test_api.py, scaled up a little) on N local
workers, each started as a fresh `python` process so that both pay the interpreter and import
start-up; rounds alternate (CLI, API, CLI, API, ...). Reported, medians over the rounds:
start-up = wall time minus the sum of the steps' times (metrics.jsonl), per step = median
step_time_s; and the API / CLI ratio of each.

    python benchmarks/api_overhead.py [--workers 2] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = {
    "model.d_model": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.vocab_size": 1024,
    "model.max_seq_len": 128,
    "data.seq_len": 64,
    "data.max_bytes": 1_000_000,
    "train.micro_batch": 4,
    "train.global_batch": 8,
    "train.warmup_steps": 2,
    "train.eval_every": 0,
    "train.sample_tokens": 0,
    "train.progress": False,
}


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _cli(workers: int, steps: int, out: Path, cache: Path) -> list[str]:
    sets = [f"{k}={_value(v)}" for k, v in {**KEYS, "train.steps": steps, "data.cache_dir": str(cache)}.items()]
    return [sys.executable, "-m", "meshlm", "train", "--nproc", str(workers), "--out", str(out)] + [
        a for s in sets for a in ("--set", s)
    ]


def _api(workers: int, steps: int, out: Path, cache: Path) -> list[str]:
    code = (
        "import meshlm\n"
        f"lm = meshlm.LanguageModel('tiny-cpu', overrides={dict(KEYS, **{'data.cache_dir': str(cache)})!r})\n"
        f"lm.fit(steps={steps}, workers={workers}, run_dir={str(out)!r}, verbose=False)\n"
    )
    return [sys.executable, "-c", code]


def _measure(cmd: list[str], out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    steps = [r["step_time_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return wall - sum(steps), statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"cli": [], "api": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        # Prepare the corpus once, outside the timing (both would reuse it).
        subprocess.run(_cli(1, 1, Path(tmp) / "warm", cache), check=True, stdout=subprocess.DEVNULL)
        for r in range(args.rounds):
            for name, build in (("cli", _cli), ("api", _api)):
                out = Path(tmp) / f"{name}-{r}"
                results[name].append(_measure(build(args.workers, args.steps, out, cache), out))
                print(
                    f"round {r + 1} {name}: start-up {results[name][-1][0]:.2f} s, step {results[name][-1][1] * 1e3:.1f} ms"
                )
    med = {k: (statistics.median(s for s, _ in v), statistics.median(p for _, p in v)) for k, v in results.items()}
    print(
        f"\n{platform.node()} {time.strftime('%Y-%m-%d')}: workers={args.workers}, steps={args.steps}, rounds={args.rounds}"
    )
    print("| | start-up (s) | per step (ms) |\n|---|---|---|")
    for name in ("cli", "api"):
        print(f"| {name} | {med[name][0]:.2f} | {med[name][1] * 1e3:.1f} |")
    print(f"| api / cli | {med['api'][0] / med['cli'][0]:.3f} | {med['api'][1] / med['cli'][1]:.3f} |")


if __name__ == "__main__":
    main()
