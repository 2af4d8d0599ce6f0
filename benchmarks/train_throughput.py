"""Single-process training throughput: meshlm against Hugging Face transformers.

Same shapes, same weights (copied), same batch, same optimizer (AdamW, foreach), float32
on CPU. The two alternate in one process, round after round, so machine noise hits both
alike; the figure is the ratio of median step times (> 1.0: meshlm is faster).

    python benchmarks/train_throughput.py [--rounds 5 --steps 5 --threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from hf_reference import SHAPES, hf_model

from meshlm.model.loss import lm_loss
from meshlm.model.registry import build_model


def make_step(model, forward_loss):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(x, y):
        loss = forward_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def meshlm_loss(model, x, y):
    return lm_loss(model(x), y)


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def timed(step, x, y, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(
        f"# train throughput, {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, batch {args.batch} x {args.seq_len}, float32"
    )
    print(
        "| model | params | meshlm tokens/s | meshlm + compile tokens/s | transformers tokens/s "
        "| ratio meshlm / HF | ratio meshlm + compile / HF |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, cfg in SHAPES.items():
        ours = build_model(cfg, seed=0)
        theirs = hf_model(cfg, ours)
        compiled = build_model(cfg, seed=0)
        for block_name, block in list(compiled.layers.named_children()):  # what train.compile=true does
            compiled.layers[block_name] = torch.compile(block)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        with torch.no_grad():  # same weights, same function
            diff = (ours(x[:1]) - theirs(input_ids=x[:1]).logits).abs().max().item()
        assert diff < 1e-3, f"{name}: logits differ by {diff}"
        steps = {
            "ours": make_step(ours, meshlm_loss),
            "compiled": make_step(compiled, meshlm_loss),
            "theirs": make_step(theirs, hf_loss),
        }
        for step in steps.values():
            timed(step, x, y, 2)  # warm-up (and compilation)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(args.rounds):
            # Rotate which goes first every round, so none always runs on a warmer cache.
            order = list(steps)[r % 3 :] + list(steps)[: r % 3]
            for key in order:
                times[key].append(timed(steps[key], x, y, args.steps))
        tokens = args.batch * args.seq_len
        med = {k: statistics.median(v) for k, v in times.items()}
        n_params = sum(p.numel() for p in ours.parameters())
        print(
            f"| {name} | {n_params / 1e6:.1f}M | {tokens / med['ours']:,.0f} | {tokens / med['compiled']:,.0f} "
            f"| {tokens / med['theirs']:,.0f} | {med['theirs'] / med['ours']:.2f} | {med['theirs'] / med['compiled']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
