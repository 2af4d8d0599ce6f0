"""The task objectives the training step runs (the protocol: meshlm.train.objective).

Sampling: step s takes the global batch's samples j = 0 .. G-1; global sample g = s*G + j is
example perm_e[g mod N] of epoch e = g div N, perm_e a permutation drawn from (seed, e) alone.
Every layout therefore sees the same examples in the same step, epochs follow one another
without partial batches, and data-parallel ranks split each batch as for language modelling.

Trimming (`trim`): a step's rows are cut to the longest example of its global batch (the same
width on every rank and micro-batch). For a left-to-right backbone the padding after a text
changes none of the scores read before it, so this is exact and saves the work on padding
(review snippets average 47 of 128 positions); pipeline schedules need one shape for every step
and right-context backbones read the padding, so finetune turns it on only without those.

Means: classification averages over examples, tagging over labelled words (CRF: the sum of the
sentences' negative log-likelihoods over their words). Each micro-batch returns its sum scaled
by (micro-batches in the step) / (units in the global batch), so the step's averaging gives
the exact mean over the global batch whatever the layout (train/objective.py).

Evaluation: the validation set padded to a multiple of the global batch with empty rows;
the summed statistics are the loss sum and its units, then a confusion matrix (classify) or
per-type span counts (tagging).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from meshlm.tasks.encoding import Encoded
from meshlm.tasks.heads import compact, crf_nll, split_crf_output, viterbi
from meshlm.tasks.metrics import classification_scores, entity_types, span_counts, span_scores


def pooled_scores(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, T, L) per-position class scores, (B, T) pooling weights -> (B, L) example scores."""
    w = weights.to(output.dtype)
    return (output * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]


def decode_tags(output: torch.Tensor, mask: torch.Tensor, crf: bool) -> list[list[int]]:
    """The predicted label id of each masked position, per row: argmax, or CRF Viterbi."""
    T = mask.shape[1]
    if crf:
        emissions, start, end, transitions = split_crf_output(output.float(), T)
        em, m = compact(emissions, mask)
        return viterbi(em, start, end, transitions, m)
    best = output[:, :T].argmax(-1)
    return [best[b][mask[b]].tolist() for b in range(mask.shape[0])]


class TaskObjective:
    def __init__(
        self,
        task: str,
        labels: list[str],
        train: Encoded | None,
        valid: Encoded | None,
        seed: int,
        crf: bool = False,
        pad: int = 0,
        trim: bool = False,
    ):
        self.task, self.labels, self.train, self.valid = task, labels, train, valid
        self.seed, self.crf, self.pad = seed, crf, pad
        self.lengths = np.asarray(train.lengths, dtype=np.int64) if trim and train is not None else None
        self.width: int | None = None
        self.types = entity_types(labels) if task != "classify" else []
        self._perms: dict[int, np.ndarray] = {}
        self.global_batch, self.scale = 0, 1.0

    # ------------------------------------------------------------------ training batches

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.train))
        return self._perms[epoch]

    def example_ids(self, step: int, sample_ids) -> np.ndarray:
        n = len(self.train)
        g = step * self.global_batch + np.asarray(sample_ids, dtype=np.int64)
        return np.array([self._perm(int(e))[p] for e, p in zip(g // n, g % n)], dtype=np.int64)

    def begin_step(self, step: int, global_batch: int, micro_batches: int) -> None:
        self.global_batch = global_batch
        ids = self.example_ids(step, range(global_batch))
        units = int(self.train.units[ids].sum())
        self.scale = micro_batches / max(units, 1)
        if self.lengths is not None:
            self.width = max(int(self.lengths[ids].max()), 1)

    def batch(self, step: int, sample_ids):
        idx = self.example_ids(step, sample_ids)
        x, y = self.train.x[idx], self.train.y[idx]
        if self.width is not None:
            x, y = x[:, : self.width], y[:, : self.width]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    # ------------------------------------------------------------------ loss

    def loss_sum(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = output.float()
        mask = target >= 0
        if self.task == "classify":
            scores = pooled_scores(output, mask)
            ce = F.cross_entropy(scores, target.max(1).values.clamp(min=0), reduction="none")
            return (ce * mask.any(1).to(ce.dtype)).sum()
        if not self.crf:
            return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="sum")
        emissions, start, end, transitions = split_crf_output(output, target.shape[1])
        em, m = compact(emissions, mask)
        tags, _ = compact(target, mask)
        return crf_nll(em, start, end, transitions, tags, m).sum()

    def loss(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(output, target) * self.scale

    # ------------------------------------------------------------------ evaluation

    def eval_samples(self, global_batch: int) -> int:
        return -(-len(self.valid) // global_batch) * global_batch

    def eval_batch(self, sample_ids, n_samples: int):
        ids = np.asarray(sample_ids, dtype=np.int64)
        real = ids < len(self.valid)
        x = np.full((len(ids), *self.valid.x.shape[1:]), self.pad, dtype=np.int64)
        if x.ndim == 3:
            x[..., 1] = 0
        y = np.full((len(ids), self.valid.y.shape[1]), -1, dtype=np.int64)
        x[real], y[real] = self.valid.x[ids[real]], self.valid.y[ids[real]]
        return torch.from_numpy(x), torch.from_numpy(y)

    @torch.no_grad()
    def eval_stats(self, pm, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_sum(output, target).double()
        mask = target >= 0
        if self.task == "classify":
            L = len(self.labels)
            rows = mask.any(1)
            pred = pooled_scores(output.float(), mask).argmax(-1)
            gold = target.max(1).values.clamp(min=0)
            conf = torch.zeros(L * L, dtype=torch.float64)
            conf.index_add_(0, (gold * L + pred)[rows].cpu(), torch.ones(int(rows.sum()), dtype=torch.float64))
            head = torch.tensor([float(loss), float(rows.sum())], dtype=torch.float64)
            return torch.cat([head, conf])
        pred = decode_tags(output, mask, self.crf)
        gold = [target[b][mask[b]].tolist() for b in range(target.shape[0])]
        names = self.labels
        counts = span_counts([[names[i] for i in g] for g in gold], [[names[i] for i in p] for p in pred], self.types)
        head = torch.tensor([float(loss), float(mask.sum())], dtype=torch.float64)
        return torch.cat([head, torch.from_numpy(counts.reshape(-1).astype(np.float64))])

    def summarize(self, stats: torch.Tensor) -> dict:
        stats = stats.double().cpu().numpy()
        out = {"loss": float(stats[0] / max(stats[1], 1))}
        if self.task == "classify":
            L = len(self.labels)
            scores = classification_scores(stats[2:].reshape(L, L), self.labels)
            out.update(accuracy=scores["accuracy"], macro_f1=scores["macro_f1"], score=scores["accuracy"])
        else:
            scores = span_scores(stats[2:].reshape(-1, 3), self.types)
            out.update(precision=scores["precision"], recall=scores["recall"], f1=scores["f1"], score=scores["f1"])
        return out
