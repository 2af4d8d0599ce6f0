"""Training methods whose step is a full pass over the training split, not a gradient step on
a sampled batch: full-batch L-BFGS (`train.optimizer = "lbfgs"`) and expectation-maximisation
(`train.optimizer = "em"`, for families whose spec has EMHooks).

Both are sums over documents, so data parallelism is exact by construction: the split is cut
into consecutive windows of data.seq_len (meshlm.data.loader.pass_batch); a pass goes through
them in rounds of global_batch windows, and within a round data-parallel rank r takes the
windows of `sample_ids_for(micro, micro_batch, r, dp)`, as for sampled batches. Each rank sums
its windows' statistics (the loss and its gradient, or EM's expected counts) and one all-reduce
over the dp group gives every rank the single-process totals; the update that follows is then
the same on every rank. Under either method the model is called directly, not through DDP:
the all-reduce here is the only communication.

    step (metrics.jsonl)   L-BFGS: one iteration (its line search evaluates the pass a few times)
                           EM: one E-step over the whole split, then the M-step
    loss                   L-BFGS: mean next-token loss (+ lbfgs_l2 / 2 |W|^2) before the step
                           EM: -(log-likelihood + log prior) / tokens, before the M-step: the
                           negative of EM's objective per token, which never increases
    grad_norm              L-BFGS: the gradient norm before the step; EM: 0 (no gradient)

A step that starts from a non-finite objective (or L-BFGS gradient) changes nothing, as for
gradient steps: `update_skipped` is set and the trainer counts it against
train.skip_nonfinite_steps (train/run_faults.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from meshlm.config import Config
from meshlm.data.loader import TokenDataset, pass_batch, pass_windows, sample_ids_for
from meshlm.model.registry import family_spec
from meshlm.parallel.parallelize import ParallelModel
from meshlm.train.step import StepRunner


def make_step_runner(cfg: Config, pm: ParallelModel, train_data, val_data, device, accum: int) -> StepRunner:
    """The step runner of `train.optimizer`."""
    runner = {"lbfgs": LBFGSStepRunner, "em": EMStepRunner}.get(cfg.train.optimizer, StepRunner)
    return runner(cfg, pm, train_data, val_data, device, accum)


class FullPassRunner(StepRunner):
    """What L-BFGS and EM share: the pass's windows, this rank's share of them, the all-reduce."""

    def __init__(self, cfg: Config, pm: ParallelModel, train_data: TokenDataset, val_data, device, accum: int):
        super().__init__(cfg, pm, train_data, val_data, device, accum)
        self.optimizer = None  # no per-parameter optimizer state (see extra_state)
        self.model = pm.modules()[0]
        self.n_windows = pass_windows(len(train_data), cfg.data.seq_len)
        self._last_grad_bytes = 0

    @property
    def tokens_per_step(self) -> int:
        return self.n_windows * self.cfg.data.seq_len

    def local_batches(self):
        """(x, y) of this rank's windows, micro_batch at a time, in a fixed order."""
        t, dp = self.cfg.train, self.pm.dims.dp
        global_batch = t.global_batch_for(dp)
        for first in range(0, self.n_windows, global_batch):
            for micro in range(self.accum):
                ids = [first + i for i in sample_ids_for(micro, t.micro_batch, self.dp_rank, dp)]
                ids = [i for i in ids if i < self.n_windows]
                if ids:
                    x, y = pass_batch(self.train_data, self.cfg.data.seq_len, ids)
                    yield x.to(self.device), y.to(self.device)

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the dp group, in place, in one flat all-reduce per dtype."""
        if self.pm.dims.dp == 1:
            return
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, group=self.pm.dp_group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def zero_grad(self) -> None:
        for _, p in self.pm.named_parameters():
            p.grad = None

    def state_bytes(self) -> dict[str, int]:
        params = sum(p.numel() * p.element_size() for _, p in self.pm.named_parameters())
        return {"params": params, "grads": self._last_grad_bytes, "optimizer": self.optimizer_bytes()}

    def optimizer_bytes(self) -> int:
        return 0

    def extra_state(self) -> dict[str, object]:
        """Optimizer state that is not per-parameter moments, replicated on every rank: the
        checkpoint stores it pickled under these keys (meshlm.train.checkpoint_state)."""
        return {}

    def load_extra_state(self, state: dict[str, object]) -> None:
        pass


class EMStepRunner(FullPassRunner):
    """One step = one Baum-Welch (or other EM) pass: expected counts of this rank's windows,
    summed over dp, then the family's M-step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.em = family_spec(self.cfg).em

    @torch.no_grad()
    def train_step(self, step: int) -> tuple[float, float]:
        self.model.train()
        totals: dict[str, torch.Tensor] | None = None
        for x, _ in self.local_batches():
            counts = self.em.expected_counts(self.model, x)
            totals = counts if totals is None else {k: totals[k] + v for k, v in counts.items()}
        if totals is None:  # fewer windows than ranks: this rank contributes zeros
            x, _ = pass_batch(self.train_data, self.cfg.data.seq_len, [0])
            totals = {k: torch.zeros_like(v) for k, v in self.em.expected_counts(self.model, x.to(self.device)).items()}
        self.all_reduce_(list(totals.values()))
        smoothing = self.cfg.train.em_smoothing
        objective = float(totals["log_likelihood"]) + self.em.log_prior(self.model, smoothing)
        loss = -objective / float(totals["tokens"])
        # Not finite (every rank agrees: the totals are global): no M-step, the parameters stay.
        self.update_skipped = not math.isfinite(loss)
        if not self.update_skipped:
            self.em.m_step(self.model, totals, smoothing)
        return loss, 0.0


class _NonFiniteStart(Exception):
    """The objective at the start of an L-BFGS step is not finite: the step is not taken."""


class LBFGSStepRunner(FullPassRunner):
    """One step = one iteration of torch.optim.LBFGS (strong-Wolfe line search, initial step 1)
    on the full-batch objective: mean loss over every window + lbfgs_l2 / 2 * |W|^2 over the
    weight matrices (dim >= 2). Every evaluation sums this rank's windows' loss and gradient and
    all-reduces both over dp, so every rank takes the same L-BFGS step as a single process."""

    def __init__(self, *args):
        super().__init__(*args)
        t = self.cfg.train
        self.params = [p for _, p in self.pm.named_parameters() if p.requires_grad]
        self.lbfgs = torch.optim.LBFGS(
            self.params,
            lr=1.0,
            max_iter=1,
            max_eval=25,
            history_size=t.lbfgs_history,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )
        self._grad_norm: float | None = None

    def full_batch_objective(self) -> torch.Tensor:
        """The full-batch objective at the current parameters; leaves its gradient in p.grad."""
        self.zero_grad()
        n_tokens = self.n_windows * self.cfg.data.seq_len
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in self.local_batches():
            loss = self.pm.loss(self.model(x), y, reduction="sum") / n_tokens
            loss.backward()
            total += loss.detach().double()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.all_reduce_([total, *[p.grad for p in self.params]])
        l2 = self.cfg.train.lbfgs_l2
        if l2:
            for p in self.params:
                if p.dim() >= 2:
                    total += l2 / 2 * p.detach().double().square().sum()
                    p.grad.add_(p.detach(), alpha=l2)
        if self._grad_norm is None:
            self._grad_norm = float(torch.sqrt(sum(p.grad.double().square().sum() for p in self.params)))
        return total.float()

    def train_step(self, step: int) -> tuple[float, float]:
        """One L-BFGS iteration; when the objective or its gradient at the current parameters is
        not finite, none: the parameters and L-BFGS's history stay, `update_skipped` is set."""
        self.model.train()
        self._grad_norm = None
        first: list[float] = []

        def closure() -> torch.Tensor:
            value = self.full_batch_objective()
            if not first:  # the point the step starts from (LBFGS evaluates it before changing anything)
                first.append(float(value))
                if not (math.isfinite(first[0]) and math.isfinite(self._grad_norm)):
                    raise _NonFiniteStart
            return value

        try:
            loss = float(self.lbfgs.step(closure))
            self.update_skipped = False
        except _NonFiniteStart:
            self.update_skipped = True
            loss = first[0]
            self.zero_grad()
        self._last_grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        return loss, self._grad_norm

    def optimizer_bytes(self) -> int:
        state = self.lbfgs.state.get(self.params[0], {})
        tensors = [v for v in state.values() if torch.is_tensor(v)]
        tensors += [t for key in ("old_dirs", "old_stps") for t in state.get(key, [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_state(self) -> dict[str, object]:
        return {"optim/lbfgs": self.lbfgs.state_dict()}

    def load_extra_state(self, state: dict[str, object]) -> None:
        self.lbfgs.load_state_dict(state["optim/lbfgs"])
