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

from meshlm.model.transformer import build_model, lm_loss

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

    print(f"# train throughput, {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, batch {args.batch} x {args.seq_len}, float32")
    print("| model | params | meshlm tokens/s | transformers tokens/s | ratio (meshlm / HF) |")
    print("|---|---|---|---|---|")
    for name, cfg in SHAPES.items():
        ours = build_model(cfg, seed=0)
        theirs = hf_model(cfg, ours)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        with torch.no_grad():  # same weights, same function
            diff = (ours(x[:1]) - theirs(input_ids=x[:1]).logits).abs().max().item()
        assert diff < 1e-3, f"{name}: logits differ by {diff}"
        step_ours, step_theirs = make_step(ours, meshlm_loss), make_step(theirs, hf_loss)
        timed(step_ours, x, y, 2), timed(step_theirs, x, y, 2)  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(step_ours, x, y, args.steps))
            t_theirs.append(timed(step_theirs, x, y, args.steps))
        tokens = args.batch * args.seq_len
        m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        n_params = sum(p.numel() for p in ours.parameters())
        print(f"| {name} | {n_params / 1e6:.1f}M | {tokens / m_ours:,.0f} | {tokens / m_theirs:,.0f} | {m_theirs / m_ours:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
