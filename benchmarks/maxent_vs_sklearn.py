"""Full-batch L-BFGS: meshlm's maxent family against scikit-learn's multinomial
LogisticRegression on the same convex problem, side by side.

The problem: next-token prediction on the default corpus with a small vocabulary (--vocab,
512 by default), every position of the training split (cut into consecutive --seq-len windows,
as `train.optimizer = "lbfgs"` does), features = the maxent model's own hashed history rows
(order --order, --rows rows per history length; scikit-learn gets them as a sparse one-hot
matrix built with meshlm.model.maxent.model.history_rows), objective

    J(W, b) = mean over positions of cross-entropy(W x + b, next token) + l2 / 2 * |W|^2

(bias unpenalised: scikit-learn's intercept; its C = 1 / (l2 * positions)). meshlm runs through
its trainer (`--set train.optimizer=lbfgs`, --steps iterations) on 1 process and on dp2 (forked
ranks); its time is the sum of the steps' step_time_s. scikit-learn runs lbfgs to tol 1e-8 (at most 500 iterations).
Both final objectives are evaluated by the same function here, in float64. Tokens that never
occur as a target are classes scikit-learn leaves out (probability 0); meshlm's bias drives
them towards 0 instead, which is the same optimum approached from above.

    OMP_NUM_THREADS=1 python benchmarks/maxent_vs_sklearn.py [--steps 150 --rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from timed_training import quiet, run_meshlm

from meshlm.artifacts.weights_file import load_weights
from meshlm.config import load_config
from meshlm.data.loader import TokenDataset, pass_batch, pass_windows
from meshlm.data.prepare import prepare_data
from meshlm.model.maxent.model import histories, history_rows


def config(args, dp: int):
    return load_config(
        None,
        [
            'model.family="maxent"',
            f"model.order={args.order}",
            f"model.hash_rows={args.rows}",
            f"model.vocab_size={args.vocab}",
            f"model.max_seq_len={args.seq_len}",
            f"data.seq_len={args.seq_len}",
            f"data.max_bytes={args.max_bytes}",
            f'data.cache_dir="{args.cache}"',
            'train.optimizer="lbfgs"',
            f"train.lbfgs_l2={args.l2}",
            f"train.steps={args.steps}",
            "train.micro_batch=128",
            f"train.global_batch={128 * dp}",
            "train.eval_every=0",
            "train.sample_tokens=0",
            "train.progress=false",
        ],
    )


def features(x: torch.Tensor, args) -> sp.csr_matrix:
    """The one-hot hashed history rows of every position: (positions, (order-1) * rows)."""
    hist = histories(x, args.order - 1).reshape(-1, args.order - 1)
    cols = [(k - 1) * args.rows + history_rows(hist[:, hist.shape[1] - k :], args.rows) for k in range(1, args.order)]
    cols = torch.stack(cols, 1).numpy()  # (N, order-1)
    n = cols.shape[0]
    data = np.ones(cols.size)
    return sp.csr_matrix(
        (data, cols.reshape(-1), np.arange(0, cols.size + 1, cols.shape[1])), shape=(n, (args.order - 1) * args.rows)
    )


def objective(X: sp.csr_matrix, y: np.ndarray, W: np.ndarray, b: np.ndarray, l2: float) -> float:
    """J(W, b) in float64: W (features, V), b (V,) (-inf for classes with probability 0)."""
    z = torch.from_numpy(np.asarray(X @ W) + b)
    ce = torch.logsumexp(z, 1) - z[torch.arange(len(y)), torch.from_numpy(y)]
    return float(ce.mean()) + l2 / 2 * float((W**2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=400_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cache", default=".meshlm-cache")
    args = p.parse_args()
    torch.set_num_threads(1)

    cfg1, cfg2 = config(args, 1), config(args, 2)
    split = TokenDataset(prepare_data(cfg1.data, args.vocab, log=quiet), "train")
    x, y = pass_batch(split, args.seq_len, range(pass_windows(len(split), args.seq_len)))
    X, y = features(x, args), y.reshape(-1).numpy()
    print(
        f"{X.shape[0]} positions, {X.shape[1]} hashed features (order {args.order}), vocabulary {args.vocab}, l2 {args.l2}"
    )
    times = {"sklearn": [], "dp1": [], "dp2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            ref = LogisticRegression(C=1.0 / (args.l2 * X.shape[0]), solver="lbfgs", max_iter=500, tol=1e-8)
            started = time.perf_counter()
            ref.fit(X, y)
            times["sklearn"].append(time.perf_counter() - started)
            times["dp1"].append(run_meshlm(cfg1, 1, Path(tmp) / "dp1"))
            # (each figure as it comes: a long run keeps what it measured if a later part fails)
            print(
                f"round: scikit-learn {times['sklearn'][-1]:.1f} s ({ref.n_iter_[0]} iterations), meshlm 1 process "
                f"{times['dp1'][-1]:.1f} s",
                flush=True,
            )
            times["dp2"].append(run_meshlm(cfg2, 2, Path(tmp) / "dp2"))
        W_ref = np.zeros((X.shape[1], args.vocab))
        b_ref = np.full(args.vocab, -np.inf)
        W_ref[:, ref.classes_] = ref.coef_.T
        b_ref[ref.classes_] = ref.intercept_
        state = load_weights(Path(tmp) / "dp1" / "model.safetensors", cfg1.model).state_dict()
        W = torch.cat([state[f"orders.{k}.weight"] for k in range(args.order - 1)]).double().numpy()
        b = state["unigram.weight"].double().numpy()
    j_ref, j = objective(X, y, W_ref, b_ref, args.l2), objective(X, y, W, b, args.l2)
    t = {k: statistics.median(v) for k, v in times.items()}
    print("| scikit-learn s (iterations) | meshlm 1 proc s | meshlm dp2 s | J scikit-learn | J meshlm | rel. diff |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {t['sklearn']:.1f} ({int(ref.n_iter_[0])}) | {t['dp1']:.1f} ({args.steps}) | {t['dp2']:.1f} | "
        f"{j_ref:.6f} | {j:.6f} | {abs(j - j_ref) / j_ref:.1e} |"
    )


if __name__ == "__main__":
    main()
