"""Baum-Welch: meshlm's hmm family against hmmlearn's CategoricalHMM, side by side.

The same token sequences (the default corpus's first --max-bytes, vocabulary 2048: its whole
training split, about 1.1e5 tokens by default, cut into consecutive windows of --seq-len as
`train.optimizer = "em"` does),
the same initial probabilities (meshlm's seeded initialisation, handed to hmmlearn), 5 EM
iterations each, for S = 32, 128 and 512 states. meshlm runs through its trainer
(`meshlm train --set model.family=hmm --set train.optimizer=em`), on 1 process and on dp2
(forked ranks, gloo); its time is the sum of the EM steps' step_time_s from metrics.jsonl.
hmmlearn runs fit() with its "scaling" implementation (its faster one; "log" is slower).
Reported: log-likelihood of the final parameters on the same sequences (both float64,
scored by each library) and wall time. Rounds alternate the two libraries; times are medians.

    OMP_NUM_THREADS=1 python benchmarks/hmm_vs_hmmlearn.py [--states 32 128 512 --rounds 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hmmlearn.hmm import CategoricalHMM
from timed_training import quiet, run_meshlm

from meshlm.config import load_config
from meshlm.data.loader import TokenDataset, pass_windows
from meshlm.data.prepare import prepare_data
from meshlm.model.registry import build_model


def config(args, states: int, dp: int):
    return load_config(
        None,
        [
            'model.family="hmm"',
            f"model.n_states={states}",
            "model.vocab_size=2048",
            f"model.max_seq_len={args.seq_len}",
            f"data.seq_len={args.seq_len}",
            f"data.max_bytes={args.max_bytes}",
            f'data.cache_dir="{args.cache}"',
            'train.optimizer="em"',
            f"train.steps={args.iters}",
            f"train.micro_batch={args.batch}",
            f"train.global_batch={args.batch * dp}",
            "train.eval_every=0",
            "train.sample_tokens=0",
            "train.progress=false",
            "train.seed=0",
        ],
    )


def meshlm_log_likelihood(out: Path, cfg, windows: torch.Tensor) -> float:
    from meshlm.artifacts.weights_file import load_weights

    model = load_weights(out / "model.safetensors", cfg.model).double()
    with torch.no_grad():
        return float(sum(model.log_likelihood(chunk).sum() for chunk in windows.split(256)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--batch", type=int, default=128, help="windows per E-step batch and rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-bytes", type=int, default=450_000)
    p.add_argument("--cache", default=".meshlm-cache")
    args = p.parse_args()
    torch.set_num_threads(1)

    data_dir = prepare_data(config(args, 32, 1).data, 2048, log=quiet)
    split = TokenDataset(data_dir, "train")
    n_windows = pass_windows(len(split), args.seq_len)
    tokens = np.asarray(split.tokens[: n_windows * args.seq_len], dtype=np.int64)
    windows = torch.from_numpy(tokens).view(n_windows, args.seq_len)
    print(f"{n_windows} windows x {args.seq_len} = {tokens.size} tokens, vocabulary 2048, {args.iters} EM iterations")
    print(
        "| S | hmmlearn s | meshlm 1 proc s | meshlm dp2 s | speed-up 1 proc | dp2 vs 1 proc | LL hmmlearn | LL meshlm | rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for states in args.states:
        times = {"hmmlearn": [], "dp1": [], "dp2": []}
        cfg1, cfg2 = config(args, states, 1), config(args, states, 2)
        init = build_model(cfg1.model, seed=cfg1.train.seed).double()
        pi = torch.softmax(init.chain["0"].initial, -1).detach().numpy()
        A = torch.softmax(init.chain["0"].transition, -1).detach().numpy()
        E = torch.softmax(init.emission.weight, -1).detach().numpy()
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                ref = CategoricalHMM(
                    n_components=states, n_features=2048, n_iter=args.iters, tol=-math.inf,
                    init_params="", params="ste", implementation="scaling",
                )  # fmt: skip
                ref.startprob_, ref.transmat_, ref.emissionprob_ = pi, A, E
                started = time.perf_counter()
                ref.fit(tokens.reshape(-1, 1), [args.seq_len] * n_windows)
                times["hmmlearn"].append(time.perf_counter() - started)
                times["dp1"].append(run_meshlm(cfg1, 1, Path(tmp) / "dp1"))
                times["dp2"].append(run_meshlm(cfg2, 2, Path(tmp) / "dp2"))
            ll_ref = ref.score(tokens.reshape(-1, 1), [args.seq_len] * n_windows)
            ll = meshlm_log_likelihood(Path(tmp) / "dp1", cfg1, windows)
        t = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {states} | {t['hmmlearn']:.2f} | {t['dp1']:.2f} | {t['dp2']:.2f} | {t['hmmlearn'] / t['dp1']:.1f}x | "
            f"{t['dp1'] / t['dp2']:.2f}x | {ll_ref:.2f} | {ll:.2f} | {abs(ll - ll_ref) / abs(ll_ref):.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
