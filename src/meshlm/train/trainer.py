"""The training loop: data, model, optimizer, evaluation, metrics and the final model.

The same loop runs one process or a hybrid dp x tp x pp world. It stays
layout-independent by construction: every batch is described by global sample ids
(data-parallel ranks split the global batch a single process would see), the loss is
the token-weighted mean over the whole global batch, the gradient norm is global over
every shard and stage, and only the main rank writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.distributed as dist

from meshlm.artifacts.run_dir import check_run_dir, init_run_dir
from meshlm.artifacts.weights_file import model_from_state_dict
from meshlm.config import Config, ConfigError
from meshlm.data.loader import TokenDataset
from meshlm.data.prepare import prepare_data
from meshlm.data.tokenizer import load_tokenizer
from meshlm.distributed.comm_profile import CommProfiler, format_comm, format_comm_time, make_ddp_visible
from meshlm.distributed.dims import ParallelDims, parallel_dims_from_config
from meshlm.distributed.env import LaunchEnv, cpu_native_bf16, read_launch_env
from meshlm.distributed.process_group import init_distributed
from meshlm.distributed.rank_zero import reported_once, run_on_rank0
from meshlm.model.registry import build_model, family_spec
from meshlm.model.stats import count_params, flops_per_token
from meshlm.parallel.gather import gather_full_state_dict
from meshlm.parallel.parallelize import ParallelModel, parallelize
from meshlm.train.checkpoint import (
    Checkpointer,
    find_resume_checkpoint,
    reopen_run_dir,
    resume_on_restart,
)
from meshlm.train.full_batch import make_step_runner
from meshlm.train.metrics import MetricsWriter, plot_losses
from meshlm.train.optim import lr_at
from meshlm.train.progress import Progress
from meshlm.train.run_faults import check_room_to_start, nonfinite_error, save_final_weights
from meshlm.train.step import accumulation_steps, dtype_note
from meshlm.train.tracing import trace_step, traced_step_index
from meshlm.utils.errors import DiskFullError

# (model, tokenizer, cfg) -> a text sample of the trained model, printed at the end of a run.
Sampler = Callable[[torch.nn.Module, tokenizers.Tokenizer, Config], str]


@dataclass
class TrainResult:
    out_dir: Path
    final_loss: float
    final_val_loss: float | None
    sample: str
    losses: list[float]


def _quiet(*args, **kwargs) -> None:
    pass


def _on_main_first(env: LaunchEnv, fn):
    """Run `fn` on rank 0, then (if it succeeded) on the others; a user error on rank 0 is
    raised on every rank, so no rank waits forever for a peer that has given up."""
    result = run_on_rank0(fn, env.distributed)
    return result if env.is_main else fn()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out_dir: Path,
        overwrite: bool = False,
        env: LaunchEnv | None = None,
        log=print,
        resume: str | None = None,
        sampler: Sampler | None = None,
    ):
        """sampler(model, tokenizer, cfg) -> text: the end-of-run sample (see `finish`), given by
        the caller (the command layer passes the inference package's sampler)."""
        if cfg.parallel.auto:
            raise ConfigError(
                'parallel = "auto" must be resolved before training starts: call '
                "meshlm.plan.auto.resolve_auto_layout(cfg, world_size) first (the `meshlm train` command does)."
            )
        self.cfg = cfg
        self.sampler = sampler
        self.out = Path(out_dir)
        self.env = env or read_launch_env()
        self.log = log if self.env.is_main else _quiet
        self.device = self.env.device
        # Everything that can be wrong with the layout fails here, before a process group exists.
        self.dims: ParallelDims = parallel_dims_from_config(cfg, self.env.world_size)
        self.accum = accumulation_steps(cfg, self.dims.dp)
        if self.env.restart_count > 0:  # restarted by the elastic agent: continue this run
            resume, overwrite = resume_on_restart(resume, self.out), False
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite deletes it; pass only one of them.")
        check_run_dir(self.out, cfg, overwrite)

        init_distributed(self.env, cfg.train.collective_timeout_s)
        self.mesh = self.dims.build_mesh(self.device.type) if self.env.distributed else None
        run_on_rank0(lambda: check_room_to_start(cfg, self.out), self.env.distributed)
        resume_from = find_resume_checkpoint(resume, self.out, self.env, self.log) if resume else None
        data_dir = _on_main_first(self.env, lambda: prepare_data(cfg.data, cfg.model.vocab_size, log=self.log))
        self.train_data = TokenDataset(data_dir, "train")
        self.val_data = TokenDataset(data_dir, "val")
        if self.env.is_main:
            if resume_from is not None:
                reopen_run_dir(self.out, cfg, resume_from.step)
            else:
                init_run_dir(self.out, cfg, overwrite)
            shutil.copyfile(data_dir / "tokenizer.json", self.out / "tokenizer.json")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.device, seed=cfg.train.seed)
        if cfg.train.init_from_hf:
            from meshlm.interop.init_from_hf import load_hf_weights_into

            load_hf_weights_into(model, cfg)
            self.log(f"model: weights from {cfg.train.init_from_hf}")
        self.log(
            f"model: {cfg.model.family} ({family_spec(cfg).describe(cfg.model)}), "
            f"{count_params(cfg.model) / 1e6:.2f}M parameters; layout {self.dims.describe} on "
            f"{self.env.world_size} process(es), {self.device.type}/{self.env.backend if self.env.distributed else 'local'}; "
            f"global batch {self.global_batch} x {cfg.data.seq_len} tokens"
        )
        note = dtype_note(cfg.train.dtype, self.device, cpu_native_bf16())
        if note:
            self.log(note)
        self.pm: ParallelModel = parallelize(model, self.dims, cfg, self.device, self.mesh)
        self.runner = make_step_runner(cfg, self.pm, self.train_data, self.val_data, self.device, self.accum)
        self.checkpoints = Checkpointer(cfg, self.out, self.env, self.pm, self.runner, log=self.log)
        self.start_step = self.checkpoints.load(resume_from) if resume_from is not None else 0
        self.comm_axes = self._comm_axes() if cfg.train.profile_comm else None
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.env.is_main)

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.global_batch_for(self.dims.dp)

    def run(self) -> TrainResult:
        t = self.cfg.train
        # A full-pass method (L-BFGS, EM) goes through the whole split in one step.
        tokens_per_step = getattr(self.runner, "tokens_per_step", self.global_batch * self.cfg.data.seq_len)
        flops_per_step = flops_per_token(self.cfg.model, self.cfg.data.seq_len) * tokens_per_step
        progress = Progress(t.steps, show_bar=t.progress, is_main=self.env.is_main, printer=self.log)
        losses: list[float] = []
        val_loss = None
        skipped = 0  # steps whose update was skipped: loss or gradient norm not finite
        try:
            for step in range(self.start_step, t.steps):
                started = time.perf_counter()
                with contextlib.ExitStack() as stack:
                    prof = stack.enter_context(CommProfiler(self.comm_axes)) if self.comm_axes is not None else None
                    if t.trace and step == traced_step_index(t.steps):
                        stack.enter_context(trace_step(self.pm, self.out, self.env.rank))
                    loss, grad_norm = self.runner.train_step(step)
                elapsed = time.perf_counter() - started
                losses.append(loss)
                if self.runner.update_skipped:
                    skipped += 1
                    self._skipped_step(step + 1, loss, grad_norm, skipped, progress)
                else:
                    if step == self.start_step:
                        self._report_state_bytes()
                    record = {
                        "step": step + 1,
                        "loss": loss,
                        "lr": lr_at(step, t),
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_step / elapsed,
                        "step_time_s": elapsed,
                        "tflops": flops_per_step / elapsed / 1e12,
                    }
                    if prof is not None:
                        record["comm"] = prof.report()
                        record["comm_time"] = prof.timing(elapsed)
                        if step == min(1, t.steps - 1):  # step 2: steady state (step 1 also infers pipeline shapes)
                            self.log(f"collectives in step {step + 1} on rank 0: " + format_comm(record["comm"]))
                            self.log(f"step {step + 1}: " + format_comm_time(record["comm_time"]))
                    if (step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps:
                        self.metrics.write(record)
                    progress.update(step + 1, loss, record["tokens_per_s"])
                if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                    val_loss = self.runner.evaluate()
                    ppl = math.exp(min(val_loss, 50))
                    self.metrics.write({"step": step + 1, "val_loss": val_loss, "val_ppl": ppl})
                    progress.write(f"step {step + 1}: val_loss {val_loss:.4f}, perplexity {ppl:.2f}")
                if self.checkpoints.due(step + 1):
                    self._checkpoint(step + 1)
            self._checkpoint(None)
        finally:
            progress.close()
            self.metrics.close()
        sample = self.finish()
        return TrainResult(self.out, losses[-1] if losses else float("nan"), val_loss, sample, losses)

    def _skipped_step(self, step: int, loss: float, grad_norm: float, skipped: int, progress: Progress) -> None:
        """A step whose update was skipped (not finite): logged, counted, and training stops once
        more than train.skip_nonfinite_steps were skipped (the weights are still the good ones)."""
        self.metrics.write({"step": step, "loss": loss, "grad_norm": grad_norm, "skipped": True})
        if skipped > self.cfg.train.skip_nonfinite_steps:
            with contextlib.suppress(Exception):
                self.checkpoints.wait()  # a save in flight holds good weights: let it finish
            raise reported_once(nonfinite_error(self.cfg, self.out, step, loss, grad_norm, skipped), self.env.rank)
        progress.write(
            f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped "
            f"({skipped} of at most {self.cfg.train.skip_nonfinite_steps})"
        )

    def _checkpoint(self, step: int | None) -> None:
        """Save the checkpoint of `step` (None: wait for the one in flight). A full disk stops
        training, except at the last step: then the final weights are still written (smaller
        than a checkpoint; see finish) and the warning says which checkpoint was not."""
        try:
            if step is None:
                self.checkpoints.wait()
            else:
                self.checkpoints.save(step)
        except DiskFullError as e:
            if step is not None and step < self.cfg.train.steps:
                raise
            self.log(f"warning: {e} Training is finished: writing the final weights instead.")

    def _comm_axes(self) -> dict[int, str]:
        """Process group -> mesh axis name, for the communication profile."""
        from torch.nn.parallel import DistributedDataParallel

        for part in self.pm.parts:
            if isinstance(part, DistributedDataParallel):
                make_ddp_visible(part)
        if self.mesh is None:
            return {}
        axes = {id(self.mesh.group(name)): name for name in self.mesh.axis_names()}
        tied_group = getattr(self.pm.tied_sync, "group", None)
        if tied_group is not None:
            axes[id(tied_group)] = "pp-tied-embedding"
        return axes

    def _report_state_bytes(self) -> None:
        """Each rank's parameter, gradient and optimizer-state bytes after the first step."""
        held = self.runner.state_bytes()
        line = {"rank": self.env.rank, **held}
        if self.env.distributed:
            every = [None] * self.env.world_size
            dist.all_gather_object(every, line)
        else:
            every = [line]
        if self.env.is_main:
            (self.out / "state_bytes.json").write_text(json.dumps(every, indent=1))
            for r in every:
                self.log(
                    f"rank {r['rank']}: params {r['params'] / 2**20:.2f} MiB, grads {r['grads'] / 2**20:.2f} MiB, "
                    f"optimizer {r['optimizer'] / 2**20:.2f} MiB"
                )

    def finish(self) -> str:
        """Save the full (gathered) model and the curves; print a short sample."""
        state = gather_full_state_dict(self.pm, self.cfg.model)
        if not self.env.is_main:
            return ""
        save_final_weights(state, self.cfg, self.out, self.cfg.train.steps)
        try:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            self.log(f"saved {self.out / 'model.safetensors'}; curves in {self.out / 'loss.png'}")
        except OSError as e:  # the curves are a convenience: the run is complete without them
            self.log(f"saved {self.out / 'model.safetensors'}; could not write {self.out / 'loss.png'} ({e})")
        if self.sampler is None or not self.cfg.train.sample_tokens:
            return ""
        # The sample comes from the gathered weights just saved, without reading the file back.
        model = model_from_state_dict(self.cfg.model, state, self.device)
        sample = self.sampler(model, load_tokenizer(self.out / "tokenizer.json"), self.cfg)
        self.log(f"--- sample ---\n{sample}\n--------------")
        return sample


def train(
    cfg: Config,
    out_dir: Path,
    overwrite: bool = False,
    log=print,
    env: LaunchEnv | None = None,
    resume: str | None = None,
    sampler: Sampler | None = None,
) -> TrainResult:
    return Trainer(cfg, out_dir, overwrite=overwrite, env=env, log=log, resume=resume, sampler=sampler).run()
