"""Int8 decoding: meshlm's engine with `quantize="int8"` against the same engine in float32 and
against Hugging Face transformers `generate()` (float32), side by side in one process.

The weight format is the only difference between the two meshlm runs (same model object, same
prompts, greedy, `--new-tokens` per sequence, no early stop). The three alternate round after
round, so machine noise hits them alike; figures are medians of the rounds, ratios are of
median times. "same tokens" is the share of generated tokens that int8 produces identically to
float32 (up to each sequence's first difference).

Models: the default tiny model (configs/tiny-cpu.toml's [model]) and a ~25M-parameter llama
(d_model 512, 8 layers, vocabulary 8192), random weights unless `--run DIR` gives a trained
run for the tiny one (speed does not depend on the values; agreement on random weights is a
weak signal: quality is measured with `meshlm eval --quantize int8` on a trained run).

    python benchmarks/quantized_decode.py [--rounds 3 --threads 2 --batches 1 16 --models tiny 25m]
    python benchmarks/quantized_decode.py --quality RUN    # a trained run: perplexity and agreement

--quality RUN: the run's validation perplexity (its own data split, prepared as training
prepared it) with float32 and with int8 weights, and the greedy continuations (64 tokens) of
16 prompts taken from the validation split, as the share of identical tokens.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from generate_throughput import agreement, run_hf, run_meshlm, timed
from hf_reference import hf_model

from meshlm.config import load_config
from meshlm.inference.engine import Engine
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig

LLAMA_25M = TransformerConfig(
    arch="llama", d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, max_seq_len=512
)


def model_for(name: str, run: str | None):
    if name == "25m":
        return LLAMA_25M, build_model(LLAMA_25M, seed=0).eval()
    if run:
        from meshlm.inference.loading import find_model_files, load_model

        loaded = load_model(find_model_files(run), torch.device("cpu"))
        return loaded.cfg.model, loaded.model.eval()
    cfg = load_config("tiny-cpu").model
    return cfg, build_model(cfg, seed=0).eval()


def quality(run: str, threads: int) -> None:
    import copy
    import math

    from meshlm.artifacts.run_dir import load_run_config
    from meshlm.data.loader import TokenDataset
    from meshlm.data.prepare import prepare_data
    from meshlm.inference.evaluate import evaluate_tokens
    from meshlm.inference.loading import find_model_files, load_model
    from meshlm.inference.quantize import quantize_linears

    torch.set_num_threads(threads)
    files = find_model_files(run)
    cfg = load_run_config(files.config.parent)
    model = load_model(files, torch.device("cpu")).model.eval()
    val = TokenDataset(prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None), "val")
    tokens = torch.from_numpy(val.tokens.astype("int64"))
    quantized = copy.deepcopy(model)
    quantize_linears(quantized)
    loss = {k: evaluate_tokens(m, tokens, cfg.data.seq_len).loss for k, m in (("float32", model), ("int8", quantized))}
    ppl = {k: math.exp(v) for k, v in loss.items()}
    rel = 100 * (ppl["int8"] - ppl["float32"]) / ppl["float32"]
    prompts = tokens[: 16 * 512].view(16, 512)[:, :32]
    outs = {k: run_meshlm(Engine(model, max_batch=16, quantize=k), prompts, 64) for k in ("none", "int8")}
    print(f"# {run}: {len(tokens):,} validation tokens, windows of {cfg.data.seq_len}")
    print("| model | float32 val perplexity | int8 val perplexity | difference | greedy tokens identical |")
    print("|---|---|---|---|---|")
    print(
        f"| {cfg.model.family} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | {ppl['float32']:.4f} | "
        f"{ppl['int8']:.4f} | {rel:+.2f}% | {100 * agreement(outs['int8'], outs['none']):.1f}% |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--models", nargs="+", default=["tiny", "25m"], choices=["tiny", "25m"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--run", default=None, help="a trained run for the tiny model (its weights)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--quality", default=None, metavar="RUN", help="perplexity and agreement of a trained run")
    args = ap.parse_args()
    if args.quality:
        return quality(args.quality, args.threads)
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(
        "| model | params | batch | float32 tok/s | int8 tok/s | int8 / float32 | transformers tok/s | int8 / transformers | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        cfg, model = model_for(name, args.run)
        params = sum(p.numel() for p in model.parameters())
        engines = {q: Engine(model, max_batch=max(args.batches), quantize=q) for q in ("none", "int8")}
        engines["float32"] = engines.pop("none")
        hf = None if args.no_hf else hf_model(cfg, model).eval()
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len), generator=g)
            times: dict[str, list[float]] = {k: [] for k in ("float32", "int8", "hf")}
            outs: dict[str, list] = {}
            run_meshlm(engines["float32"], prompts[:, :4], 2)  # warm up
            run_meshlm(engines["int8"], prompts[:, :4], 2)
            for _ in range(args.rounds):
                for key in ("float32", "int8"):
                    t, outs[key] = timed(run_meshlm, engines[key], prompts, args.new_tokens)
                    times[key].append(t)
                if hf is not None:
                    t, _ = timed(run_hf, hf, prompts, args.new_tokens)
                    times["hf"].append(t)
            tokens = batch * args.new_tokens
            rate = {k: tokens / statistics.median(v) for k, v in times.items() if v}
            hf_rate = f"{rate['hf']:,.0f}" if "hf" in rate else "-"
            hf_ratio = f"{rate['int8'] / rate['hf']:.2f}" if "hf" in rate else "-"
            print(
                f"| {name} | {params / 1e6:.1f}M | {batch} | {rate['float32']:,.0f} | {rate['int8']:,.0f} | "
                f"{rate['int8'] / rate['float32']:.2f} | {hf_rate} | {hf_ratio} | "
                f"{100 * agreement(outs['int8'], outs['float32']):.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
