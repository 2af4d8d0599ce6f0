"""`meshlm plan --serve`'s decode step against meshlm's own engine on this CPU.

python benchmarks/planner_serve.py [--configs tiny-cpu maxent-tiny hmm-tiny] [--batches 1 8 32]
                                   [--prompt-len 64 --gen-len 64 --rounds 3]

For each config and batch n: the planner's predicted decode step (one process, cpu-local,
prompt + gen tokens, the average context; plan/serve.py) against the engine (inference/engine.py,
one thread) decoding n greedy requests together: the median duration of its decode steps
(every step after the prefill while all n sequences are active) and the fastest, over --rounds
rounds. The prediction times the family's decode state at its best (as a calibration does), so
its error is given against the engine's fastest step; the median shows the machine's load.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meshlm.config import load_config
from meshlm.inference.engine import Engine, Request
from meshlm.inference.sampling import SamplingParams
from meshlm.model.registry import build_model
from meshlm.plan import make_cluster
from meshlm.plan.serve import ServeTargets, plan_serving


def engine_decode_step(model, n: int, prompt_len: int, gen_len: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    engine = Engine(model, None, max_batch=n, max_len=prompt_len + gen_len)
    params = SamplingParams(max_new_tokens=gen_len, temperature=0.0, stop_token_ids=())
    for _ in range(n):
        engine.add(Request(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params))
    steps = []
    first = True
    while engine.has_work:
        start = time.perf_counter()
        events = engine.step()
        took = time.perf_counter() - start
        if not first and len(events) == n:
            steps.append(took)
        first = False
    return statistics.median(steps), min(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny-cpu", "maxent-tiny", "hmm-tiny"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    cluster = make_cluster("cpu-local", None, 1)
    print("| config | batch | predicted decode step (ms) | engine fastest (ms) | error | engine median (ms) |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = load_config(name, [])
        model = build_model(cfg.model, "cpu", seed=0).eval()
        for n in args.batches:
            targets = ServeTargets(args.prompt_len, args.gen_len, max_batch=n)
            est = next(e for e in plan_serving(cfg.model, cluster, targets) if e.tp == 1)
            with torch.inference_mode():
                runs = [engine_decode_step(model, n, args.prompt_len, args.gen_len, r) for r in range(args.rounds)]
            med = statistics.median(r[0] for r in runs)
            best = min(r[1] for r in runs)
            err = est.decode_step_s / best - 1
            print(
                f"| {name} | {n} | {1e3 * est.decode_step_s:.2f} | {1e3 * best:.2f} | {100 * err:+.0f}% | {1e3 * med:.2f} |"
            )


if __name__ == "__main__":
    main()
