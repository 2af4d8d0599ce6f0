"""Memory-mapped token files and deterministic, layout-independent batches.

Sampling scheme (the contract the parallel parity tests rely on)
----------------------------------------------------------------
A training step `s` consumes the *global batch* of samples `0 .. G-1`
(G = global_batch sequences). Sample `j` of step `s` is the window starting at a
random offset drawn from `PCG64([seed, s, j])` alone, so a sample is the same
whoever draws it, whatever was drawn before (resuming at step k needs no
replay), and however the batch is cut up.

The batch is cut up micro-step-major: with `dp` data-parallel ranks and micro
batch `B`, rank `r` at micro-step `m` takes samples

    (m * dp + r) * B + i        for i in 0 .. B-1        (see `sample_ids_for`)

so over all ranks and micro-steps (m < G / (B * dp)) a step covers exactly
`0 .. G-1`: one process with B = G sees the same global batch as any dp x
accumulation layout. Tensor- and pipeline-parallel ranks of one data-parallel
rank use the same sample ids.

Evaluation uses a fixed set of `n_samples` windows at evenly spaced offsets over
the validation split (no randomness); `eval_batch` takes any subset of its
sample ids, so ranks can split the set the same way (`sample_ids_for(b, B, r, dp)`
for eval batch b) while the set itself, and hence the mean loss, does not
depend on the layout as long as `n_samples` does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from meshlm.config import ConfigError
from meshlm.data.index import bin_file, bin_problem, read_index
from meshlm.utils.file_hash import file_sha256

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenDataset:
    """One split of a prepared data directory, memory-mapped (nothing is read until used)."""

    def __init__(self, data_dir: Path | str, split: Literal["train", "val"] = "train", verify: bool = False):
        self.dir = Path(data_dir)
        self.split = split
        self.index = read_index(self.dir)
        path = self.dir / bin_file(split)
        problem = bin_problem(self.dir, self.index, split)
        if problem is None and verify and file_sha256(path) != self.index["sha256"][path.name]:
            problem = f"{path} does not match the sha256 recorded in index.json"
        if problem:
            raise ConfigError(f"{problem}. Delete {self.dir} and run `meshlm data prepare` again.")
        self.n_tokens = int(self.index[f"n_{split}_tokens"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eot_id = int(self.index["eot_id"])
        dtype = np.dtype(self.index["dtype"])
        # np.memmap cannot map an empty file; an empty split is reported when sampled.
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if self.n_tokens else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.dir)!r}, {self.split!r}, n_tokens={self.n_tokens})"


# ----------------------------------------------------------------------------- training batches


def sample_ids_for(micro_step: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """The global sample ids that data-parallel rank `dp_rank` uses at `micro_step` (module docstring)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside 0 .. {dp_size - 1}")
    first = (micro_step * dp_size + dp_rank) * micro_batch
    return list(range(first, first + micro_batch))


def train_offsets(n_tokens: int, seq_len: int, seed: int, step: int, sample_ids: Sequence[int]) -> np.ndarray:
    """Window start of each sample: uniform in [0, n_tokens - seq_len - 1], from (seed, step, sample id) only."""
    high = _max_offset(n_tokens, seq_len, "train") + 1
    return np.array(
        [np.random.Generator(np.random.PCG64([seed, step, j])).integers(0, high) for j in sample_ids],
        dtype=np.int64,
    )


def train_batch(dataset: TokenDataset, seq_len: int, seed: int, step: int, sample_ids: Sequence[int]) -> Batch:
    """Inputs and targets (B, T) int64 for the given global sample ids of `step`; y is x shifted by one."""
    return _windows(dataset, seq_len, train_offsets(len(dataset), seq_len, seed, step, sample_ids))


def get_batch(
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    rank: int = 0,
    micro_step: int = 0,
    dp_size: int = 1,
) -> Batch:
    """`batch_size` sequences for data-parallel `rank` of `dp_size` at (`step`, `micro_step`)."""
    return train_batch(dataset, seq_len, seed, step, sample_ids_for(micro_step, batch_size, rank, dp_size))


# ----------------------------------------------------------------------------- evaluation


def eval_offsets(n_tokens: int, seq_len: int, sample_ids: Sequence[int], n_samples: int) -> np.ndarray:
    """Window starts of a fixed evaluation set of `n_samples` windows, evenly spaced over the split."""
    last = _max_offset(n_tokens, seq_len, "val")
    ids = np.asarray(sample_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_samples):
        raise ValueError(f"evaluation sample ids must be in 0 .. {n_samples - 1}")
    return ids * last // max(n_samples - 1, 1)


def eval_batch(dataset: TokenDataset, seq_len: int, sample_ids: Sequence[int], n_samples: int) -> Batch:
    """The windows `sample_ids` of the `n_samples`-window evaluation set, as (x, y)."""
    return _windows(dataset, seq_len, eval_offsets(len(dataset), seq_len, sample_ids, n_samples))


def eval_batches(dataset: TokenDataset, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
    """The whole evaluation set (n_batches x batch_size windows) for a single process."""
    n_samples = batch_size * n_batches
    return [
        eval_batch(dataset, seq_len, range(b * batch_size, (b + 1) * batch_size), n_samples) for b in range(n_batches)
    ]


# ----------------------------------------------------------------------------- full passes


def pass_windows(n_tokens: int, seq_len: int) -> int:
    """How many windows a full pass over a split has: window i is tokens [i*seq_len, (i+1)*seq_len]
    (inputs, targets shifted by one), consecutive and non-overlapping (full-batch L-BFGS, EM)."""
    return max(0, (n_tokens - 1) // seq_len)


def pass_batch(dataset: TokenDataset, seq_len: int, window_ids: Sequence[int]) -> Batch:
    """Windows `window_ids` of the full pass over `dataset`, as (x, y) (B, T)."""
    return _windows(dataset, seq_len, np.asarray(window_ids, dtype=np.int64) * seq_len)


# ----------------------------------------------------------------------------- helpers


def _max_offset(n_tokens: int, seq_len: int, split: str) -> int:
    if n_tokens < seq_len + 1:
        raise ConfigError(
            f"the {split} split has {n_tokens} tokens, fewer than data.seq_len + 1 = {seq_len + 1} needed for one "
            f"window. Use more data, a smaller data.seq_len, or a larger data.val_fraction, and prepare again."
        )
    return n_tokens - seq_len - 1


def _windows(dataset: TokenDataset, seq_len: int, offsets: np.ndarray) -> Batch:
    idx = offsets[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    window = torch.from_numpy(dataset.tokens[idx].astype(np.int64))  # gathers from the memmap
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
