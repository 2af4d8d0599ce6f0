"""Per model family: generation with the family's incremental decoding state (the engine)
against full recomputation (the model run on the whole sequence for every new token).

Random weights of each case's config, one prompt of 16 tokens, 256 new tokens, greedy, batch 1,
float32, CPU. The two alternate round after round in one process, so machine noise hits both
alike; the ratio is of the median times (target: at least 5x at 256 new tokens). "same tokens"
checks that both generated the same sequence. Cases: llama and gpt2 on the tiny-cpu shapes, and
every `configs/*-tiny.toml` (one per family, as families land).

    python benchmarks/decode_vs_recompute.py [--rounds 3 --new-tokens 256 --threads 1]
    python benchmarks/decode_vs_recompute.py --cases llama gpt2 --set model.d_model=256 model.n_layers=6
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from meshlm.config import ConfigError, load_config
from meshlm.inference.engine import Engine, Request
from meshlm.inference.sampling import SamplingParams
from meshlm.inference.simple_generate import generate_tokens
from meshlm.model.registry import build_model, family_spec

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "meshlm" / "configs"


def cases() -> dict[str, tuple[Path, list[str]]]:
    out = {
        "llama": (CONFIGS / "tiny-cpu.toml", []),
        "gpt2": (CONFIGS / "tiny-cpu.toml", ['model.arch="gpt2"', "model.n_kv_heads=0"]),
    }
    for path in sorted(CONFIGS.glob("*-tiny.toml")):
        out[path.name.removesuffix("-tiny.toml")] = (path, [])
    return out


def timed(fn) -> tuple[float, list[int]]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--set", nargs="+", default=[], help="config overrides for every case (e.g. a larger size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.prompt_len + args.new_tokens
    print(
        f"# incremental decoding vs full recomputation, torch {torch.__version__}, {args.threads} thread(s), "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch 1, float32, "
        f"median of {args.rounds} alternating rounds"
    )
    print("| case | family | parameters | state tokens/s | recompute tokens/s | ratio | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, (path, overrides) in cases().items():
        if args.cases and name not in args.cases:
            continue
        overrides = [*overrides, *args.set]
        try:
            cfg = load_config(path, overrides).model
            if cfg.max_seq_len < length:  # random weights: any context length will do
                cfg = load_config(path, [*overrides, f"model.max_seq_len={length}"]).model
        except ConfigError as e:
            print(f"| {name} | | | ({e}) | | | |")
            continue
        spec = family_spec(cfg)
        if spec.decode_state is None:
            print(f"| {name} | {spec.name} | | (no decode state) | | | |")
            continue
        model = build_model(cfg, seed=0).eval()
        prompt = torch.randint(1, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.tolist()
        engine = Engine(model, max_batch=1)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_token_ids=())

        def with_state():
            return engine.generate([Request(prompt, params)])[0].token_ids

        def recompute():
            return list(generate_tokens(model, prompt, args.new_tokens, temperature=0))

        engine.generate([Request(prompt, SamplingParams(max_new_tokens=4, temperature=0.0))])  # warm-up
        times: dict[str, list[float]] = {"state": [], "recompute": []}
        outs = {}
        for r in range(args.rounds):
            for key, fn in (("state", with_state), ("recompute", recompute))[:: 1 if r % 2 == 0 else -1]:
                t, outs[key] = timed(fn)
                times[key].append(t)
        state_t, recompute_t = statistics.median(times["state"]), statistics.median(times["recompute"])
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        print(
            f"| {name} | {spec.name} | {n / 1e6:.2f}M | {args.new_tokens / state_t:,.0f} | "
            f"{args.new_tokens / recompute_t:,.0f} | {recompute_t / state_t:.1f} | "
            f"{'yes' if outs['state'] == outs['recompute'] else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
