"""bf16 training on CPU: meshlm with `train.dtype = "bfloat16"` (bf16 autocast, float32 master
weights, what the trainer does) against meshlm in float32 and against Hugging Face
transformers under the same bf16 autocast.

Same shapes, same weights (copied), same batch, same optimizer (AdamW, foreach). The three
alternate in one process, round after round (the first one rotating), so machine noise hits
them alike; figures are medians of the rounds, ratios are of median step times. Also reports
whether the CPU has native bf16 (AVX512-BF16 / AMX): without it bf16 matrix multiplies are
emulated and bf16 is expected to lose.

    python benchmarks/bf16_train.py [--rounds 3 --steps 3 --threads 2]
    python benchmarks/bf16_train.py --curve 300    # the loss curves of two real runs instead

--curve N trains the same small llama (d_model 64, 2 layers, vocabulary 512, 16 x 64 tokens a
step, the default corpus) for N steps with the trainer, once in float32 and once with
train.dtype=bfloat16, and prints both loss curves (means over windows of steps) and the final
validation losses.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from hf_reference import SHAPES, hf_model
from train_throughput import hf_loss, make_step, meshlm_loss, timed

from meshlm.distributed.env import cpu_native_bf16
from meshlm.model.registry import build_model


def autocast(step):
    def run(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(x, y)

    return run


CURVE = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.max_bytes=2000000",
    "train.micro_batch=16",
    "train.global_batch=16",
    "train.warmup_steps=20",
    "train.eval_batches=8",
    "train.progress=false",
    "train.sample_tokens=8",
]


def loss_curves(steps: int, out: str) -> None:
    from pathlib import Path

    from meshlm.config import load_config
    from meshlm.train.metrics import read_metrics
    from meshlm.train.trainer import train

    curves, finals = {}, {}
    for dtype in ("float32", "bfloat16"):
        overrides = [*CURVE, f"train.steps={steps}", f"train.eval_every={steps}", f"train.dtype={dtype}"]
        run = Path(out) / dtype
        result = train(load_config(None, overrides), run, overwrite=True, log=lambda *a, **k: None)
        records = read_metrics(run / "metrics.jsonl")
        curves[dtype] = [r["loss"] for r in records if "loss" in r]
        finals[dtype] = result.final_val_loss
    window = max(1, steps // 10)
    print("| steps | float32 loss | bf16 loss | bf16 - float32 |\n|---|---|---|---|")
    for start in range(0, steps, window):
        a, b = (statistics.mean(curves[k][start : start + window]) for k in ("float32", "bfloat16"))
        print(f"| {start + 1}-{min(steps, start + window)} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    a, b = finals["float32"], finals["bfloat16"]
    print(f"| final validation | {a:.4f} | {b:.4f} | {b - a:+.4f} ({100 * (b - a) / a:+.2f}%) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--curve", type=int, default=0, metavar="STEPS", help="compare loss curves instead")
    parser.add_argument("--curve-dir", default="/tmp/meshlm-bf16-curve", help="where --curve writes its two runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.curve:
        return loss_curves(args.curve, args.curve_dir)
    print(
        f"# bf16 train, {platform.processor() or platform.machine()}, native bf16: {cpu_native_bf16() or 'none'}, "
        f"{args.threads} threads, torch {torch.__version__}, batch {args.batch} x {args.seq_len}"
    )
    print("| model | float32 tok/s | bf16 tok/s | bf16 / float32 | transformers bf16 tok/s | meshlm bf16 / HF bf16 |")
    print("|---|---|---|---|---|---|")
    for name, cfg in SHAPES.items():
        steps = {
            "fp32": make_step(build_model(cfg, seed=0), meshlm_loss),
            "bf16": autocast(make_step(build_model(cfg, seed=0), meshlm_loss)),
            "hf": autocast(make_step(hf_model(cfg, build_model(cfg, seed=0)), hf_loss)),
        }
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        for step in steps.values():
            timed(step, x, y, 1)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(args.rounds):
            order = list(steps)[r % 3 :] + list(steps)[: r % 3]
            for key in order:
                times[key].append(timed(steps[key], x, y, args.steps))
        tokens = args.batch * args.seq_len
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {name} | {tokens / med['fp32']:,.0f} | {tokens / med['bf16']:,.0f} | {med['fp32'] / med['bf16']:.2f} "
            f"| {tokens / med['hf']:,.0f} | {med['hf'] / med['bf16']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
