"""What a model is trained to do: the batches it sees and the loss it minimises.

The training step (train/step.py) is the same for every objective: global sample ids split
over the data-parallel ranks (data/loader.py's scheme), micro-batches accumulated or run
through the pipeline schedule, gradients reduced and clipped globally. An objective supplies
the three things that differ:

    batch(step, sample_ids)     -> (x, y): inputs for the first stage, targets for the last
    loss(pm, output, y)         -> this micro-batch's share of the step's loss (see below)
    eval_stats(pm, output, y)   -> a 1-D float64 tensor of sums (loss sum, counts, ...) that
                                   add up over micro-batches and ranks; summarize() turns the
                                   total into the result of `StepRunner.evaluate()`

Exact means, whatever the layout. The step divides each micro-batch's loss by the number of
micro-batches a rank runs (accumulation or pipeline micro-batches, `k`), and data parallelism
averages over the `dp` ranks: the step's loss is sum(micro losses) / (dp * k). An objective
whose units (tokens, labelled words, examples) are unevenly spread over micro-batches makes
that the true mean over the global batch by returning, per micro-batch,
sum(unit losses) * dp * k / (units in the global batch): `begin_step` tells it dp * k and
the step, so it can count the global batch's units itself (every rank can: the sample ids of
a step are known to all). Language modelling needs none of this: every window has the same
number of tokens, so the plain mean per micro-batch is already exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from meshlm.data.loader import TokenDataset, eval_batch, train_batch


class Objective(Protocol):
    def begin_step(self, step: int, global_batch: int, micro_batches: int) -> None:
        """Called before each step's forwards: `micro_batches` = dp x (micro-batches per rank)."""

    def batch(self, step: int, sample_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def eval_samples(self, global_batch: int) -> int:
        """How many evaluation samples there are (a multiple of `global_batch`)."""

    def eval_batch(self, sample_ids: Sequence[int], n_samples: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def eval_stats(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def summarize(self, stats: torch.Tensor) -> Any: ...


class LanguageModelling:
    """Next-token prediction on windows of a token file: the default objective. Its loss is the
    vocabulary-parallel cross-entropy under tensor parallelism (pm.lm_loss)."""

    def __init__(self, train_data: TokenDataset, val_data: TokenDataset, seq_len: int, seed: int, eval_batches: int):
        self.train_data, self.val_data = train_data, val_data
        self.seq_len, self.seed, self.eval_batches = seq_len, seed, eval_batches

    def begin_step(self, step: int, global_batch: int, micro_batches: int) -> None:
        pass

    def batch(self, step: int, sample_ids: Sequence[int]):
        return train_batch(self.train_data, self.seq_len, self.seed, step, sample_ids)

    def loss(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pm.lm_loss(output, target, reduction="mean")

    def eval_samples(self, global_batch: int) -> int:
        return self.eval_batches * global_batch

    def eval_batch(self, sample_ids: Sequence[int], n_samples: int):
        return eval_batch(self.val_data, self.seq_len, sample_ids, n_samples)

    def eval_stats(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss_sum = pm.lm_loss(output, target, reduction="sum").detach()
        return torch.stack([loss_sum.to(torch.float64), torch.tensor(float(target.numel()), dtype=torch.float64)])

    def summarize(self, stats: torch.Tensor) -> float:
        """The mean validation loss per token."""
        return float(stats[0] / stats[1])
