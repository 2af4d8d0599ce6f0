"""Generation throughput: meshlm's KV-cache engine against Hugging Face transformers `generate()`.

Same shapes, same weights (copied), same prompts, greedy, 128 new tokens per sequence
(no early stop on either side), float32 on CPU. The two alternate in one process, round
after round, so machine noise hits both alike; the figure is the ratio of median times
(> 1.0: meshlm is faster). Also reports how many generated tokens agree (both are greedy
on the same function; float rounding may flip a near-tie and then the continuations part).

    python benchmarks/generate_throughput.py [--rounds 5 --threads 2 --batches 1 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from hf_reference import SHAPES, hf_model

from meshlm.inference.engine import Engine, Request
from meshlm.inference.sampling import SamplingParams
from meshlm.model.registry import build_model


def run_meshlm(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    return [c.token_ids for c in engine.generate([Request(p, params) for p in prompts.tolist()])]


@torch.no_grad()
def run_hf(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, prompts.shape[1] :].tolist()


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated tokens equal up to the first difference of each sequence."""
    same = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / sum(len(x) for x in a)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", help="cpu (the benchmark) or cuda (meshlm with CUDA graphs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    where = f"{args.device}, " + (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{cpu_name()}, {args.threads} threads"
    )
    print(
        f"# generate throughput, {where}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy, float32, median of {args.rounds} alternating rounds"
    )
    print("| model | batch | meshlm tokens/s | transformers tokens/s | ratio (meshlm / HF) | same tokens |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        cfg = SHAPES[name]
        ours = build_model(cfg, seed=0).eval()
        theirs = hf_model(cfg, ours).eval().to(args.device)
        ours = ours.to(args.device)
        for batch in args.batches:
            prompts = torch.randint(
                1, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)
            )
            prompts = prompts.to(args.device)
            engine = Engine(ours, max_batch=batch)
            run_meshlm(engine, prompts, 8), run_hf(theirs, prompts, 8)  # warm-up
            t_ours, t_theirs = [], []
            for _ in range(args.rounds):
                t, out_ours = timed(run_meshlm, engine, prompts, args.new_tokens)
                t_ours.append(t)
                t, out_theirs = timed(run_hf, theirs, prompts, args.new_tokens)
                t_theirs.append(t)
            assert all(len(x) == args.new_tokens for x in out_ours + out_theirs)
            tokens = batch * args.new_tokens
            m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
            print(
                f"| {name} | {batch} | {tokens / m_ours:,.0f} | {tokens / m_theirs:,.0f} | {m_theirs / m_ours:.2f} | "
                f"{agreement(out_ours, out_theirs):.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
