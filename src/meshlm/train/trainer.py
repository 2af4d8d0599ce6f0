"""The training loop: data, model, optimizer, evaluation, metrics and the final model.

Written for one process here, but without assuming it: every batch is described by
global sample ids (so data-parallel ranks split the same global batch a single process
would see), the loss is a token-weighted mean over the whole global batch, and only
the main rank writes files.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meshlm.config import Config, ConfigError
from meshlm.data.loader import TokenDataset, eval_batch, sample_ids_for, train_batch
from meshlm.data.prepare import prepare_data
from meshlm.data.tokenizer import load_tokenizer
from meshlm.distributed.env import LaunchEnv, read_launch_env
from meshlm.model.stats import count_params, flops_per_token
from meshlm.model.transformer import Transformer, build_model, lm_loss
from meshlm.model.weights_file import save_weights
from meshlm.parallel.parallelize import parallelize
from meshlm.train.metrics import MetricsWriter, plot_losses
from meshlm.train.optim import build_optimizer, lr_at, set_lr
from meshlm.train.progress import Progress
from meshlm.train.run_dir import check_run_dir, init_run_dir


@dataclass
class TrainResult:
    out_dir: Path
    final_loss: float
    final_val_loss: float | None
    sample: str


def accumulation_steps(cfg: Config, dp: int) -> int:
    """global_batch = micro_batch x accumulation x dp; 0 global_batch means no accumulation."""
    t = cfg.train
    if not t.global_batch:
        return 1
    per_step = t.micro_batch * dp
    if t.global_batch % per_step:
        raise ConfigError(
            f"'train.global_batch' ({t.global_batch}) must be a multiple of 'train.micro_batch' ({t.micro_batch}) "
            f"x data-parallel degree ({dp}) = {per_step}; change one of them."
        )
    return t.global_batch // per_step


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path, overwrite: bool = False, env: LaunchEnv | None = None, log=print):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.env = env or read_launch_env()
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.device = self.env.device
        self.dp_rank, self.dp_size = 0, 1
        self.accum = accumulation_steps(cfg, self.dp_size)
        check_run_dir(self.out, cfg, overwrite)

        data_dir = prepare_data(cfg.data, cfg.model.vocab_size, log=self.log)
        self.train_data = TokenDataset(data_dir, "train")
        self.val_data = TokenDataset(data_dir, "val")
        if self.env.is_main:
            init_run_dir(self.out, cfg, overwrite)
            shutil.copyfile(data_dir / "tokenizer.json", self.out / "tokenizer.json")

        torch.manual_seed(cfg.train.seed)
        self.model: Transformer = build_model(cfg.model, self.device, seed=cfg.train.seed)
        self.log(
            f"model: {cfg.model.arch}, {count_params(cfg.model) / 1e6:.2f}M parameters, "
            f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}; "
            f"global batch {self.global_batch} x {cfg.data.seq_len} tokens "
            f"(micro-batch {cfg.train.micro_batch} x accumulation {self.accum} x dp {self.dp_size})"
        )
        self.train_model = parallelize(self.model, cfg)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.env.is_main)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch * self.accum * self.dp_size

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (loss, grad_norm)."""
        t, seq_len = self.cfg.train, self.cfg.data.seq_len
        self.train_model.train()
        total_tokens = self.global_batch * seq_len
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            ids = sample_ids_for(micro, t.micro_batch, self.dp_rank, self.dp_size)
            x, y = train_batch(self.train_data, seq_len, t.seed, step, ids)
            x, y = x.to(self.device), y.to(self.device)
            with autocast_context(self.cfg, self.device):
                logits = self.train_model(x)
            # Sum over tokens, divided by the global token count: the token-weighted mean
            # over micro-batches and ranks, identical for every layout.
            loss = lm_loss(logits, y, reduction="sum") / total_tokens
            loss.backward()
            loss_sum += loss.detach()
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        set_lr(self.optimizer, lr_at(step, t))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum), float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> float:
        t, seq_len = self.cfg.train, self.cfg.data.seq_len
        self.train_model.eval()
        total, count = 0.0, 0
        n_samples = t.eval_batches * t.micro_batch
        for b in range(t.eval_batches):
            ids = range(b * t.micro_batch, (b + 1) * t.micro_batch)
            x, y = eval_batch(self.val_data, seq_len, ids, n_samples)
            with autocast_context(self.cfg, self.device):
                logits = self.train_model(x.to(self.device))
            total += float(lm_loss(logits, y.to(self.device), reduction="sum"))
            count += y.numel()
        return total / count

    def run(self) -> TrainResult:
        t = self.cfg.train
        tokens_per_step = self.global_batch * self.cfg.data.seq_len
        flops_per_step = flops_per_token(self.cfg.model, self.cfg.data.seq_len) * tokens_per_step
        progress = Progress(t.steps, enabled=t.progress and self.env.is_main)
        loss, val_loss = float("nan"), None
        try:
            for step in range(t.steps):
                started = time.perf_counter()
                loss, grad_norm = self.train_step(step)
                elapsed = time.perf_counter() - started
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss} at step {step + 1}. Lower 'train.lr' (now {t.lr}) "
                        f"or enable gradient clipping ('train.grad_clip')."
                    )
                record = {
                    "step": step + 1, "loss": loss, "lr": lr_at(step, t), "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed,
                    "tflops": flops_per_step / elapsed / 1e12,
                }
                if (step + 1) % t.log_every == 0 or step == 0:
                    self.metrics.write(record)
                progress.update(step + 1, loss, record["tokens_per_s"])
                if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                    val_loss = self.evaluate()
                    self.metrics.write({"step": step + 1, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                    progress.write(f"step {step + 1}: val_loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
        finally:
            progress.close()
            self.metrics.close()
        sample = self.finish()
        return TrainResult(self.out, loss, val_loss, sample)

    def finish(self) -> str:
        """Save the final model and the curves, and print a short sample."""
        if not self.env.is_main:
            return ""
        save_weights(self.model.state_dict(), self.cfg.model, self.out / "model.safetensors")
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        from meshlm.inference.simple_generate import LoadedModel, generate_text

        loaded = LoadedModel(self.cfg, self.model.eval(), load_tokenizer(self.out / "tokenizer.json"))
        prompt = self.cfg.train.sample_prompt
        sample = prompt + generate_text(loaded, prompt, self.cfg.train.sample_tokens, temperature=0.8, top_k=40, seed=self.cfg.train.seed)
        self.log(f"saved {self.out / 'model.safetensors'}; curves in {self.out / 'loss.png'}\n--- sample ---\n{sample}\n--------------")
        return sample


def train(cfg: Config, out_dir: Path, overwrite: bool = False, log=print) -> TrainResult:
    return Trainer(cfg, out_dir, overwrite=overwrite, log=log).run()
