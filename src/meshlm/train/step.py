"""One optimizer step and one evaluation, for any layout and any objective (train/objective.py:
language modelling by default; a task model's classification or tagging loss).

loss      = sum over the global batch's tokens / their count
          = mean over dp ranks of (mean over this rank's micro-batches of the micro-batch mean)
            (every LM window has the same length, so plain means are token-weighted means; an
            objective with uneven units per micro-batch rescales its micro-batch sums so that
            the same averaging yields the exact global mean)
gradient  = d loss / d params: micro-batch losses are divided by the accumulation count
            (or scaled by the pipeline schedule) and DDP / FSDP / ZeRO average over dp
grad norm = global over every shard, stage and replica (parallel/grad_norm.py)
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from meshlm.config import Config
from meshlm.data.loader import TokenDataset, sample_ids_for
from meshlm.parallel.data_parallel import gradient_sync
from meshlm.parallel.grad_norm import clip_coefficient, global_norm, scale_grads_, weighted_grad_sq_sum
from meshlm.parallel.parallelize import ParallelModel
from meshlm.parallel.wrappers import local_tensor
from meshlm.train.objective import LanguageModelling, Objective
from meshlm.train.optim import build_optimizer, lr_at, set_lr


def accumulation_steps(cfg: Config, dp: int) -> int:
    """Micro-batches per rank and step: global_batch = micro_batch x accumulation x dp
    (parallel_dims_from_config has checked that it divides)."""
    return cfg.train.global_batch_for(dp) // (cfg.train.micro_batch * dp)


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dtype_note(dtype: str, device: torch.device, native_bf16: str) -> str | None:
    """The log line on the CPU's bf16 support (native_bf16: distributed.env.cpu_native_bf16()).
    Nothing is switched: float32 stays the default and the parity tests' reference; the line
    says where bf16 would pay and where it does not (docs/performance.md, measured)."""
    if device.type != "cpu":
        return None
    if dtype == "bfloat16" and not native_bf16:
        return (
            "dtype: bfloat16 autocast on a CPU without AVX512-BF16 or AMX: its bf16 matrix multiplies are "
            "emulated and slower than float32 (docs/performance.md); set train.dtype=float32 on this CPU."
        )
    if dtype == "bfloat16":
        return f"dtype: bfloat16 autocast, on this CPU's {native_bf16} bf16 instructions."
    if native_bf16:
        return (
            f"dtype: float32; this CPU has {native_bf16} bf16 instructions: train.dtype=bfloat16 may train "
            "faster (docs/performance.md)."
        )
    return None


def _strip_index(name: str) -> str:
    """ModuleList names ("0.layers.1.x") back to model names ("layers.1.x")."""
    head, _, rest = name.partition(".")
    return rest if head.isdigit() else name


class StepRunner:
    def __init__(
        self,
        cfg: Config,
        pm: ParallelModel,
        train_data: TokenDataset,
        val_data: TokenDataset,
        device: torch.device,
        accum: int,
        objective: Objective | None = None,
    ):
        """`objective`: what the model is trained to do; None: language modelling on
        train_data / val_data (which an objective of its own may leave None)."""
        self.cfg, self.pm, self.device, self.accum = cfg, pm, device, accum
        self.train_data, self.val_data = train_data, val_data
        self.update_skipped = False  # the last train_step's loss or gradient norm was not finite
        self._last_grad_bytes = 0
        if objective is None:
            objective = LanguageModelling(
                train_data, val_data, cfg.data.seq_len, cfg.train.seed, cfg.train.eval_batches
            )
        else:
            pm.objective = objective  # the loss of the step and of the pipeline's last stage
        self.objective = objective
        dims = pm.dims
        self.dp_rank = pm.mesh.local_rank("dp") if pm.mesh is not None else 0
        self.pp_rank = pm.mesh.local_rank("pp") if pm.mesh is not None else 0
        self.zero = None
        if dims.zero in (1, 2) and dims.dp > 1:
            from meshlm.parallel.zero import ZeroOptimizer

            self.zero = ZeroOptimizer(
                torch.nn.ModuleList(pm.modules()),
                pm.dp_group,
                dims.zero,
                cfg.train,
                grad_weight=lambda name: 1.0 / pm.grad_copies(_strip_index(name)),
            )
            self.optimizer = None
        else:
            self.optimizer = build_optimizer(pm.named_parameters(), cfg.train)

    # ------------------------------------------------------------------ training

    def _local_sample_ids(self, micro: int) -> list[int]:
        return sample_ids_for(micro, self.cfg.train.micro_batch, self.dp_rank, self.pm.dims.dp)

    def _batch(self, step: int, ids: list[int]):
        x, y = self.objective.batch(step, ids)
        return x.to(self.device), y.to(self.device)

    def forward_backward(self, step: int) -> torch.Tensor:
        """Forward and backward over this rank's share of the global batch; returns its mean loss."""
        pm = self.pm
        per_rank = pm.schedule.n_microbatches if pm.schedule is not None else self.accum
        self.objective.begin_step(step, self.cfg.train.global_batch_for(pm.dims.dp), per_rank * pm.dims.dp)
        if pm.schedule is not None:
            from meshlm.parallel.pipeline import pipeline_step

            # The schedule is the accumulation: it takes this rank's whole batch (all its
            # micro-batches' samples) and splits it into pipeline micro-batches itself.
            ids = [i for m in range(self.accum) for i in self._local_sample_ids(m)]
            x, y = self._batch(step, ids)
            with autocast_context(self.cfg, self.device):
                loss = pipeline_step(pm.schedule, pm.stage_ids, pm.n_stages, pm.pp_group, x, y)
            return torch.as_tensor(loss, dtype=torch.float32, device=self.device)
        part = pm.parts[0]
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self._batch(step, self._local_sample_ids(micro))
            last = micro == self.accum - 1
            with gradient_sync(part, last):
                with autocast_context(self.cfg, self.device):
                    logits = part(x)
                loss = self.objective.loss(pm, logits, y) / self.accum
                with self._zero_overlap(last):
                    loss.backward()
            total += loss.detach()
        return total

    def _zero_overlap(self, last: bool):
        """ZeRO-1/2: the last backward launches the buckets' reduce-scatters as they are ready;
        not under sequence parallelism, whose gradient all-reduce comes after the backward."""
        if self.zero is None or not last or self.pm.dims.sequence_parallel:
            return contextlib.nullcontext()
        return self.zero.overlap_backward()

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (loss, grad_norm), equal on every rank.
        A step whose loss or gradient norm is not finite changes nothing: its gradients are
        dropped, the optimizer does not step, and `update_skipped` is set (every rank agrees:
        both values are global)."""
        t, pm = self.cfg.train, self.pm
        for module in pm.modules():
            module.train()
        loss = self._dp_mean(self.forward_backward(step))
        self._sync_replicated_grads()
        if self.zero is not None:
            self.zero.reduce_gradients()
            sq = self.zero.grad_sq_sum()
        else:
            sq = weighted_grad_sq_sum(pm.named_parameters(), pm.grad_copies, self.device)
        norm = global_norm(sq)
        self.update_skipped = not (math.isfinite(loss) and math.isfinite(float(norm)))
        if self.update_skipped:
            self.zero_grad()
            return loss, float(norm)
        coef = clip_coefficient(norm, t.grad_clip)
        lr = lr_at(step, t)
        if self.zero is not None:
            self.zero.step(lr, coef)
        else:
            scale_grads_([p for _, p in pm.named_parameters()], coef)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self._last_grad_bytes = self._grad_bytes()
        self.zero_grad()
        return loss, float(norm)

    def zero_grad(self) -> None:
        if self.zero is not None:
            self.zero.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _sync_replicated_grads(self) -> None:
        """Gradients that tensor or pipeline parallelism leaves partial on each rank."""
        pm = self.pm
        if pm.dims.sequence_parallel:
            from meshlm.parallel.tensor_parallel import sync_sequence_parallel_grads

            for module in pm.modules():
                sync_sequence_parallel_grads(module, pm.tp_group)
        if pm.tied_sync is not None:
            pm.tied_sync.sync_tied_embedding_grads()

    def _dp_mean(self, value: torch.Tensor) -> float:
        """Average a per-dp-rank value over the dp group (gloo has no AVG: sum, then divide)."""
        if self.pm.dims.dp > 1:
            value = value.detach().clone()
            dist.all_reduce(value, group=self.pm.dp_group)
            value /= self.pm.dims.dp
        return float(value)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self):
        """The objective's summary of a fixed validation set (language modelling: the mean loss
        over eval_batches x global_batch windows), the same samples for every layout; each dp
        rank takes its contiguous share of every evaluation batch, in the same shapes as
        training, and the objective's sums are reduced."""
        t, pm = self.cfg.train, self.pm
        for module in pm.modules():
            module.eval()
        global_batch = t.global_batch_for(pm.dims.dp)
        local = global_batch // pm.dims.dp
        n_samples = self.objective.eval_samples(global_batch)
        objective = self.objective
        sums = None
        for b in range(n_samples // global_batch):
            first = b * global_batch + self.dp_rank * local
            if pm.schedule is not None:
                from meshlm.parallel.pipeline import pipeline_forward_eval

                chunks = [list(range(first, first + local))]
            else:
                chunks = [
                    list(range(s, min(s + t.micro_batch, first + local)))
                    for s in range(first, first + local, t.micro_batch)
                ]
            for ids in chunks:
                x, y = objective.eval_batch(ids, n_samples)
                x, y = x.to(self.device), y.to(self.device)
                with autocast_context(self.cfg, self.device):
                    if pm.schedule is not None:
                        stats = pipeline_forward_eval(
                            pm.schedule,
                            pm.stage_ids,
                            pm.n_stages,
                            pm.pp_group,
                            x,
                            y,
                            reduce_fn=lambda out, target: objective.eval_stats(pm, out, target),
                        )
                    else:
                        stats = objective.eval_stats(pm, pm.parts[0](x), y)
                stats = stats.to(device=self.device, dtype=torch.float64)
                sums = stats if sums is None else sums + stats
        if pm.dims.dp > 1:
            dist.all_reduce(sums, group=pm.dp_group)
        return objective.summarize(sums.cpu())

    # ------------------------------------------------------------------ observability

    def _grad_bytes(self) -> int:
        if self.zero is not None:
            return self.zero.state_bytes()["grads"]
        return sum(
            local_tensor(p.grad).numel() * p.grad.element_size()
            for _, p in self.pm.named_parameters()
            if p.grad is not None
        )

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients (as held at the end of the step) and optimizer state on this rank."""
        if self.zero is not None:
            held = dict(self.zero.state_bytes())
            held["grads"] = self._last_grad_bytes
            return held
        params = sum(local_tensor(p).numel() * p.element_size() for _, p in self.pm.named_parameters())
        optimizer = sum(
            local_tensor(v).numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        return {"params": params, "grads": self._last_grad_bytes, "optimizer": optimizer}
