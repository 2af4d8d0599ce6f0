"""Decode speed: a family's incremental decoding state against full recomputation.

For each config (any family whose spec has a `decode_state`): the same model, the same
prompts, greedy, `--new-tokens` new tokens per sequence. "incremental" prefills the prompts
into the family's DecodeState and feeds one token per step; "recompute" runs the whole model
over the whole sequence so far for every new token (what a model without a decode state
must do). The two alternate in one process, round after round, so machine noise hits both
alike; the figure is the ratio of median times (incremental speed-up), in wall-clock time and
in this process's CPU time (on a shared machine the CPU time is the steadier of the two: it
does not count the time other processes hold the cores). Both must produce the same tokens
(checked: they compute the same function).

    python benchmarks/decode_state.py [--configs gcnn-tiny --batches 1 8 --rounds 5 --threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from meshlm.config import load_config
from meshlm.model.registry import build_model, family_spec


@torch.no_grad()
def incremental(model, spec, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    n, T = prompts.shape
    state = spec.decode_state(model, n, T + new_tokens)
    logits = state.prefill(prompts.tolist(), list(range(n)))
    out = []
    for _ in range(new_tokens):
        token = logits.argmax(dim=-1)  # (n,)
        out.append(token)
        logits = state.decode(token)
    return torch.stack(out, dim=1)  # (n, new_tokens)


@torch.no_grad()
def recompute(model, spec, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompts
    for _ in range(new_tokens):
        token = model(ids)[:, -1].argmax(dim=-1)  # the whole sequence, every step
        ids = torch.cat((ids, token[:, None]), dim=1)
    return ids[:, prompts.shape[1] :]


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of this process, fn's result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["gcnn-tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.prompt_tokens + args.new_tokens
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), float32")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; medians of {args.rounds} rounds")
    print(
        "| config | model | batch | incremental tokens/s | recompute tokens/s | speed-up (wall) "
        "| speed-up (CPU time) | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = load_config(name, [f"model.max_seq_len={max(length, load_config(name).model.max_seq_len)}"])
        spec = family_spec(cfg)
        if spec.decode_state is None:
            print(f"| {name} | {spec.describe(cfg.model)} | - | family has no decode state | | | | |")
            continue
        model = build_model(cfg.model, seed=0).eval()
        for batch in args.batches:
            prompts = torch.randint(
                0, cfg.model.vocab_size, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch)
            )
            times = {"incremental": [], "recompute": []}
            cpu_times = {"incremental": [], "recompute": []}
            outputs = {}
            for r in range(args.rounds):
                order = ("incremental", "recompute") if r % 2 == 0 else ("recompute", "incremental")
                for which in order:
                    fn = incremental if which == "incremental" else recompute
                    seconds, cpu_seconds, outputs[which] = timed(fn, model, spec, prompts, args.new_tokens)
                    times[which].append(seconds)
                    cpu_times[which].append(cpu_seconds)
            inc, rec = (statistics.median(times[k]) for k in ("incremental", "recompute"))
            inc_cpu, rec_cpu = (statistics.median(cpu_times[k]) for k in ("incremental", "recompute"))
            same = torch.equal(outputs["incremental"], outputs["recompute"])
            tokens = batch * args.new_tokens
            print(
                f"| {name} | {spec.describe(cfg.model)}, {spec.count_params(cfg.model) / 1e6:.2f}M | {batch} "
                f"| {tokens / inc:,.0f} | {tokens / rec:,.0f} | {rec / inc:.1f}x | {rec_cpu / inc_cpu:.1f}x | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
