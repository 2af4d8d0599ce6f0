"""Which family? Validation perplexity and training speed of every model family on the default
corpus, at two sizes (about 1M and 5M parameters), with the same token budget, side by side in
one run; and the validation-loss curves of all of them in one PNG.

    python benchmarks/families.py [--tokens 1_000_000] [--sizes small,medium] [--models llama,gcnn]
                                  [--threads 2] [--out runs/families]

Each model trains in this process (one process, float32, the default corpus prepared once) with
the same batch (micro_batch x seq_len tokens per step) and the same number of steps; the
learning rate is each family's usual one. tokens/s is the median over the logged steps.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meshlm.config import load_config  # noqa: E402
from meshlm.model.registry import family_names  # noqa: E402
from meshlm.model.stats import count_params  # noqa: E402
from meshlm.train.metrics import read_metrics  # noqa: E402
from meshlm.train.trainer import train  # noqa: E402

# name -> size -> overrides (family keys and the learning rate that family trains well with)
MODELS: dict[str, dict[str, list[str]]] = {
    "llama": {
        "small": [
            'model.family="transformer"',
            'model.arch="llama"',
            "model.d_model=128",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.tie_embeddings=true",
            "train.lr=3e-3",
        ],
        "medium": [
            'model.family="transformer"',
            'model.arch="llama"',
            "model.d_model=256",
            "model.n_layers=6",
            "model.n_heads=8",
            "model.n_kv_heads=4",
            "model.tie_embeddings=true",
            "train.lr=2e-3",
        ],
    },
    "gpt2": {
        "small": [
            'model.family="transformer"',
            'model.arch="gpt2"',
            "model.d_model=128",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.n_kv_heads=0",
            "train.lr=3e-3",
        ],
        "medium": [
            'model.family="transformer"',
            'model.arch="gpt2"',
            "model.d_model=256",
            "model.n_layers=6",
            "model.n_heads=8",
            "model.n_kv_heads=0",
            "train.lr=2e-3",
        ],
    },
    "gcnn": {
        "small": [
            'model.family="gcnn"',
            "model.d_model=128",
            "model.n_layers=6",
            "model.kernel_size=4",
            "model.tie_embeddings=true",
            "train.lr=3e-3",
        ],
        "medium": [
            'model.family="gcnn"',
            "model.d_model=256",
            "model.n_layers=10",
            "model.kernel_size=4",
            "model.tie_embeddings=true",
            "train.lr=2e-3",
        ],
    },
    "lstm": {
        "small": [
            'model.family="lstm"',
            "model.d_embed=128",
            "model.d_hidden=256",
            "model.n_layers=2",
            "model.tie_embeddings=true",
            "train.lr=3e-3",
        ],
        "medium": [
            'model.family="lstm"',
            "model.d_embed=256",
            "model.d_hidden=512",
            "model.n_layers=2",
            "model.tie_embeddings=true",
            "train.lr=2e-3",
        ],
    },
    # the classical families (issue 12), trained by the same gradient steps here (their EM and
    # L-BFGS trainers are compared with hmmlearn and scikit-learn in their own benchmarks)
    "maxent": {
        "small": ['model.family="maxent"', "model.order=3", "model.hash_rows=256", "train.lr=1e-2"],
        "medium": ['model.family="maxent"', "model.order=3", "model.hash_rows=1024", "train.lr=1e-2"],
    },
    "hmm": {
        "small": ['model.family="hmm"', "model.n_states=384", "train.lr=1e-2"],
        "medium": ['model.family="hmm"', "model.n_states=1024", "train.lr=1e-2"],
    },
}
COMMON = [
    "data.seq_len=128",
    "model.max_seq_len=256",
    "model.vocab_size=2048",
    "train.micro_batch=16",
    "train.global_batch=16",
    "train.eval_batches=16",
    "train.progress=false",
    "train.sample_tokens=0",
]


def run_one(name: str, size: str, overrides: list[str], tokens: int, out: Path) -> dict:
    steps = max(1, tokens // (16 * 128))
    cfg = load_config(
        None,
        COMMON
        + overrides
        + [
            f"train.steps={steps}",
            f"train.eval_every={max(1, steps // 8)}",
            f"train.warmup_steps={max(1, steps // 20)}",
        ],
    )
    run = out / f"{name}-{size}"
    started = time.perf_counter()
    result = train(cfg, run, overwrite=True, log=lambda *a, **k: None)
    wall = time.perf_counter() - started
    records = read_metrics(run / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    evals = [(r["step"] * 16 * 128, r["val_loss"]) for r in records if "val_loss" in r]
    return {
        "model": name,
        "size": size,
        "family": cfg.model.family,
        "params": count_params(cfg.model),
        "val_loss": result.final_val_loss,
        "val_ppl": math.exp(result.final_val_loss),
        "tokens_per_s": statistics.median(speeds),
        "wall_s": wall,
        "curve": evals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per model")
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/families")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if MODELS[n]["small"][0].split('"')[1] in family_names()]
    rows = [run_one(n, s, MODELS[n][s], args.tokens, out) for s in args.sizes.split(",") for n in names]
    print(f"# {platform.machine()}, 1 process, {args.threads} threads, {args.tokens:,} training tokens per model")
    print("| model | size | parameters | val perplexity | train tokens/s | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['val_ppl']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs, ys = zip(*r["curve"])
        ax.plot(
            xs,
            ys,
            label=f"{r['model']} {r['size']} ({r['params'] / 1e6:.1f}M)",
            linestyle="-" if r["size"] == "small" else "--",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Model families on the Python standard library")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "families.png", dpi=120)
    (out / "families.json").write_text(json.dumps(rows, indent=1))
    print(f"curves: {out / 'families.png'}")


if __name__ == "__main__":
    main()
