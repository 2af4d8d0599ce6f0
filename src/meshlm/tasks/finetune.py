"""Fine-tuning a task model under any layout: `meshlm finetune` and the Python API's fit.

    cfg = finetune_config("ner", "train.conll", from_run="runs/lm")   # resolve + validate
    result = finetune(cfg, "train.conll", "valid.conll", "runs/ner")  # on this process's rank

The step is the language model's (meshlm.train.step.StepRunner) with a task objective
(tasks/objective.py), so every layout the backbone's family can run fine-tunes exactly as one
process does. Training runs `task.epochs` passes (or train.steps steps), evaluates the
validation split once per epoch (or every train.eval_every steps) and keeps the best evaluated
model (accuracy, or span F1); `task.patience` stops early. After each validation it writes a
checkpoint (the training state, as `meshlm train` does, plus the best model so far and the
early-stopping count), from which `resume` continues exactly, under any layout.

The run directory: config.toml (the backbone's sections and [task], labels included),
tokenizer.json, model.safetensors (the task model), metrics.jsonl, loss.png, and
eval_valid.json (the kept model's validation scores).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meshlm.artifacts.run_dir import write_text_atomic
from meshlm.config import ConfigError, ParallelConfig
from meshlm.data.tokenizer import load_tokenizer
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.distributed.env import LaunchEnv, read_launch_env
from meshlm.distributed.process_group import init_distributed
from meshlm.model.registry import build_model, family_spec
from meshlm.parallel.gather import gather_full_state_dict
from meshlm.parallel.parallelize import parallelize
from meshlm.tasks.backbone import check_backbone_run, converted_hf_run, load_backbone_weights
from meshlm.tasks.config import TASKS, TaskRunConfig, validate_task_config
from meshlm.tasks.encoding import encode, label_set, pad_id
from meshlm.tasks.formats import read_examples
from meshlm.tasks.objective import TaskObjective
from meshlm.tasks.spec import with_task_model
from meshlm.train.checkpoint import Checkpointer, ResumePoint, find_resume_checkpoint, reopen_run_dir
from meshlm.train.checkpoint_manifest import checkpoints_dir
from meshlm.train.metrics import MetricsWriter, plot_losses
from meshlm.train.progress import Progress
from meshlm.train.run_faults import save_final_weights
from meshlm.train.step import StepRunner, accumulation_steps
from meshlm.utils.errors import RunError

# Fine-tuning settings applied over the backbone run's [train] section, before --set; train.lr
# is the backbone family's (ModelConfig.FINETUNE_LR), train.min_lr a tenth of it.
SEQ_LEN = {"classify": 128, "ner": 64, "srl": 64}
TRAIN_DEFAULTS = {
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "beta2": 0.99,
    "micro_batch": 16,
    "global_batch": 32,
    "grad_clip": 1.0,
    "eval_every": 0,  # 0: once per epoch
    "sample_tokens": 0,
    "checkpoint_every": 0,
    "keep_checkpoints": 1,  # resuming needs the newest only
    "init_from_hf": "",
}
# What a fine-tuning checkpoint holds besides the training state (train/checkpoint.py).
BEST_FILE = "best.safetensors"
STATE_FILE = "finetune_state.json"
# [task] settings per task, applied before --set. Classification gets the hashed n-gram
# embeddings (tasks/ngrams.py; on the unseen English reviews and the built-in docstrings they
# beat every backbone alone).
TASK_DEFAULTS = {"classify": {"ngram_buckets": 1 << 18}, "ner": {}, "srl": {}}
# task.patience unless --set: a run of epochs stops after one without a better validation score;
# a run of train.steps steps (task.epochs = 0) runs them all.
EPOCH_PATIENCE = 1
# task.epochs is 4, or more on a small set so that fine-tuning runs at least this many steps of
# the default batch (at most MAX_EPOCHS): the built-in docstrings (92 steps an epoch) still gained
# at epoch 5, the built-in taggers (188 steps an epoch) at epochs 7-8, where srl passed the CRF
# baseline; a 10k-review set peaked after one epoch (docs/benchmarks.md, "Tasks").
MIN_STEPS = {"classify": 700, "ner": 1500, "srl": 1500}
MAX_EPOCHS = 20


def default_epochs(task: str, n_examples: int) -> float:
    wanted = math.ceil(MIN_STEPS[task] * TRAIN_DEFAULTS["global_batch"] / max(n_examples, 1))
    return float(max(4, min(MAX_EPOCHS, wanted)))


# Tasks fine-tuned with right context where the backbone's family offers it (ModelConfig.
# RIGHT_CONTEXT: non-causal attention, a bidirectional LSTM): a tag is read at a word's first
# subword, and a causal backbone cannot see the words after it there (e.g. the "(" that makes a
# name a call). Measured better on both built-in taggers for the LSTM, and for the llama once
# fine-tuning runs past about 190 steps, which the default epochs do (docs/benchmarks.md, "Tasks:
# causal vs bidirectional context"); applied before --set, which can switch it off.
RIGHT_CONTEXT_TASKS = ("ner", "srl")


@dataclass
class FinetuneResult:
    out_dir: Path
    losses: list[float]
    evals: list[dict] = field(default_factory=list)
    best: dict | None = None  # the kept model's validation scores (with its "step")
    seconds: float = 0.0


def _quiet(*args, **kwargs) -> None:
    pass


def backbone_run(from_run=None, init_from_hf=None, cache_dir: str = ".meshlm-cache", log=print) -> Path:
    """The run directory holding the backbone: --from, a converted --init-from-hf, or the
    default backbone (built on first use; default_backbone.py)."""
    if from_run and init_from_hf:
        raise ConfigError("pass at most one of --from RUN_DIR and --init-from-hf HF_DIR.")
    if from_run:
        return Path(from_run)
    if init_from_hf:
        return converted_hf_run(Path(init_from_hf), Path(cache_dir))
    from meshlm.tasks.default_backbone import default_backbone

    return default_backbone(Path(cache_dir), log=log)


def finetune_config(
    task: str,
    train_path: Path | str,
    backbone: Path | str,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
) -> TaskRunConfig:
    """The resolved, validated config of a fine-tuning run (labels and scheme from the training
    data, steps from task.epochs); every user error is raised here, before any process starts."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    from meshlm.config import apply_overrides

    backbone = Path(backbone)
    base = check_backbone_run(backbone)
    cfg = TaskRunConfig(model=base.model, data=base.data, train=base.train, parallel=ParallelConfig())
    cfg.task.name, cfg.task.backbone = task, str(backbone)
    cfg.data.seq_len = min(SEQ_LEN[task], cfg.model.max_seq_len)
    for key, value in TRAIN_DEFAULTS.items():
        setattr(cfg.train, key, value)
    cfg.train.lr = cfg.model.FINETUNE_LR
    cfg.train.min_lr = cfg.model.FINETUNE_LR / 10
    examples, scheme = read_examples(train_path, task)
    for key, value in TASK_DEFAULTS[task].items():
        setattr(cfg.task, key, value)
    cfg.task.epochs = default_epochs(task, len(examples))
    cfg.task.patience = None  # marks "not set": resolved below, once task.epochs is known
    right_context = cfg.model.right_context_override()
    if task in RIGHT_CONTEXT_TASKS and right_context:
        apply_overrides(cfg, [right_context])
    apply_overrides(cfg, list(overrides))
    if cfg.task.patience is None:
        cfg.task.patience = EPOCH_PATIENCE if cfg.task.epochs > 0 else 0
    cfg.task.name = task
    cfg.task.labels, cfg.task.scheme = label_set(task, examples), scheme
    if cfg.parallel.auto:
        raise ConfigError('parallel = "auto" is not offered for fine-tuning; set the [parallel] degrees.')
    run_cfg = with_task_model(cfg)
    validate_task_config(run_cfg)
    dims = parallel_dims_from_config(run_cfg, world_size)
    if cfg.task.epochs > 0:
        cfg.train.steps = max(1, math.ceil(cfg.task.epochs * len(examples) / cfg.train.global_batch_for(dims.dp)))
    return cfg


def finetune(
    cfg: TaskRunConfig,
    train_path: Path | str,
    valid_path: Path | str,
    out: Path | str,
    env: LaunchEnv | None = None,
    log=print,
    resume: str | None = None,
) -> FinetuneResult:
    """Fine-tune on this process's rank of the launch (one process, or a torchrun / spawned
    world): every rank calls it with the same arguments; rank 0 writes the run directory.
    resume: "auto" (the newest complete checkpoint in `out`, or a fresh start when there is
    none) or a checkpoint or run directory, as `meshlm train --resume` takes."""
    started = time.perf_counter()
    env = env or read_launch_env()
    log = log if env.is_main else _quiet
    out = Path(out)
    run_cfg = with_task_model(cfg)
    tm_cfg = run_cfg.model
    dims = parallel_dims_from_config(run_cfg, env.world_size)
    accum = accumulation_steps(run_cfg, dims.dp)
    t = cfg.train
    backbone = Path(cfg.task.backbone)
    tokenizer = load_tokenizer(backbone / "tokenizer.json")
    labels = cfg.task.labels
    train_ex, _ = read_examples(train_path, cfg.task.name)
    valid_ex, _ = read_examples(valid_path, cfg.task.name)
    enc = dict(task=cfg.task.name, labels=labels, seq_len=cfg.data.seq_len, pooling=cfg.task.pooling)
    train_enc = encode(train_ex, tokenizer, source=str(train_path), **enc)
    valid_enc = encode(valid_ex, tokenizer, source=str(valid_path), **enc)
    # Trimming padding is exact for a left-to-right backbone; a pipeline needs one shape (objective.py).
    trim = dims.pp == 1 and not t.compile and cfg.model.right_context_setting() is None
    objective = TaskObjective(
        cfg.task.name, labels, train_enc, valid_enc, t.seed, cfg.task.crf, pad_id(tokenizer), trim=trim
    )

    init_distributed(env, t.collective_timeout_s)
    mesh = dims.build_mesh(env.device.type) if env.distributed else None
    resume_from = find_resume_checkpoint(resume, out, env, log) if resume else None
    if resume_from is not None:  # before the model is built: a mismatch wastes no work
        _check_same_task_model(resume_from, cfg)
    torch.manual_seed(t.seed)
    model = build_model(tm_cfg, env.device, seed=t.seed)
    fresh = load_backbone_weights(model, backbone / "model.safetensors")
    if fresh:
        log(
            f"finetune: {len(fresh)} backbone tensors not in {backbone} start from their initialisation ({fresh[0]}, ...)"
        )
    log(
        f"finetune: {cfg.task.name} on {family_spec(tm_cfg).describe(tm_cfg)}; {len(train_ex)} training / "
        f"{len(valid_ex)} validation examples, {len(labels)} labels; {t.steps} steps of {t.global_batch_for(dims.dp)}; "
        f"layout {dims.describe} on {env.world_size} process(es)"
    )
    pm = parallelize(model, dims, run_cfg, env.device, mesh)
    runner = StepRunner(run_cfg, pm, None, None, env.device, accum, objective)
    if env.is_main:
        if resume_from is not None:
            reopen_run_dir(out, cfg, resume_from.step)
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            # An earlier run's checkpoints would outrank this run's (`meshlm finetune` refuses
            # such an --out without --resume; the Python API's fit starts over).
            shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
            write_text_atomic(out / "config.toml", cfg.to_toml())
        shutil.copyfile(backbone / "tokenizer.json", out / "tokenizer.json")
    checkpoints = Checkpointer(run_cfg, out, env, pm, runner, log=log, record=cfg)
    result = FinetuneResult(out, [])
    best_state, stale, skipped, start = None, 0, 0, 0
    if resume_from is not None:
        start = checkpoints.load(resume_from)
        result.evals, result.best, stale, skipped, best_state = _load_progress(resume_from, env.is_main)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=env.is_main)
    every = t.eval_every or max(1, math.ceil(len(train_ex) / t.global_batch_for(dims.dp)))
    progress = Progress(t.steps, show_bar=t.progress, is_main=env.is_main, printer=log)

    def progress_files(folder: Path) -> None:  # rank 0, into a checkpoint before it is published
        if best_state is not None:
            save_file({name: value.contiguous() for name, value in best_state.items()}, folder / BEST_FILE)
        state = {"evals": result.evals, "best": result.best, "stale": stale, "skipped": skipped}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    try:
        for step in range(start, t.steps):
            tick = time.perf_counter()
            loss, grad_norm = runner.train_step(step)
            if runner.update_skipped:  # not finite: the step changed nothing (StepRunner)
                skipped += 1
                metrics.write({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "skipped": True})
                if skipped > t.skip_nonfinite_steps:
                    raise _nonfinite_error(cfg, out, step + 1, loss, grad_norm, skipped)
                progress.write(
                    f"step {step + 1}: loss {loss}: update skipped ({skipped} of at most {t.skip_nonfinite_steps})"
                )
            else:
                result.losses.append(loss)
                elapsed = time.perf_counter() - tick
                metrics.write({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "step_time_s": elapsed})
                progress.update(step + 1, loss, t.global_batch_for(dims.dp) * cfg.data.seq_len / elapsed)
            evaluated = (step + 1) % every == 0 or step + 1 == t.steps
            if evaluated:
                scores = runner.evaluate()
                scores["step"] = step + 1
                result.evals.append(scores)
                metrics.write(
                    {
                        "step": step + 1,
                        "val_loss": scores["loss"],
                        **{k: v for k, v in scores.items() if k not in ("loss", "step")},
                    }
                )
                progress.write(_describe(scores))
                if result.best is None or scores["score"] > result.best["score"]:
                    result.best, stale = scores, 0
                    # A copy: in one process on the CPU the gathered tensors are the live parameters.
                    best_state = _copied(gather_full_state_dict(pm, tm_cfg))
                else:
                    stale += 1
                    if cfg.task.patience and stale >= cfg.task.patience:
                        progress.write(f"step {step + 1}: no better validation score in {stale} evaluations; stopping")
                        break
            # The last step needs none: the run ends with its model written.
            if step + 1 < t.steps and ((evaluated and cfg.task.checkpoints) or checkpoints.due(step + 1)):
                checkpoints.save(step + 1, files=progress_files)
        checkpoints.wait()  # an asynchronous save (train.async_checkpoint) still in flight
    finally:
        progress.close()
        metrics.close()
    result.seconds = time.perf_counter() - started
    if env.is_main:
        # A full disk keeps the weights elsewhere and says where (train/run_faults.py).
        save_final_weights(best_state, run_cfg, out, t.steps)
        write_text_atomic(out / "eval_valid.json", json.dumps(result.best, indent=1) + "\n")
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        log(f"finetune: kept the model of step {result.best['step']} ({_describe(result.best)}); saved {out}")
    return result


# The [task] keys that shape the task model: a checkpoint loads only into the same ones.
MODEL_TASK_KEYS = ("name", "labels", "crf", "ngram_buckets", "ngram_dim", "ngram_orders")


def _check_same_task_model(point: ResumePoint, cfg: TaskRunConfig) -> None:
    saved = point.manifest.get("config", {}).get("task", {})
    mine = cfg.to_dict()["task"]
    differ = [f"task.{k}" for k in MODEL_TASK_KEYS if saved.get(k) != mine[k]]
    if differ:
        raise ConfigError(
            f"--resume {point.path}: the checkpoint's task model differs from this run's ({', '.join(differ)}: the "
            f"training data's labels or the --set values changed); resume with the data and settings it was trained "
            f"with, or start a new run in another --out."
        )


def _load_progress(point: ResumePoint, is_main: bool) -> tuple[list[dict], dict | None, int, int, dict | None]:
    """The evaluations, best scores, early-stopping and skipped-step counts a checkpoint holds,
    and (rank 0, which writes the model) the best model so far."""
    try:
        state = json.loads((point.path / STATE_FILE).read_text())
        best = state["best"]
        weights = load_file(point.path / BEST_FILE) if is_main and best is not None else None
        return state["evals"], best, state["stale"], state["skipped"], weights
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--resume {point.path}: it is no fine-tuning checkpoint ({STATE_FILE} or {BEST_FILE} is missing or "
            f"unreadable: {e}); resume from a checkpoint of `meshlm finetune`, or start again without --resume."
        ) from None


def _copied(state: dict | None) -> dict | None:
    return None if state is None else {name: value.clone() for name, value in state.items()}


def _nonfinite_error(cfg: TaskRunConfig, out: Path, step: int, loss: float, grad_norm: float, skipped: int) -> RunError:
    allowed = cfg.train.skip_nonfinite_steps
    counted = (
        f" after {skipped - 1} skipped non-finite step(s) (train.skip_nonfinite_steps = {allowed})" if allowed else ""
    )
    return RunError(
        f"fine-tuning stopped at step {step}{counted}: the loss is {loss} and the gradient norm {grad_norm}, which "
        f"are not finite; this step's update was not applied and no model was written to {out}. Lower train.lr "
        f"(now {cfg.train.lr}), keep train.grad_clip on (now {cfg.train.grad_clip}), or let meshlm skip such steps "
        f"with --set train.skip_nonfinite_steps=N, and run the command again."
    )


def _describe(scores: dict) -> str:
    keys = ("accuracy", "macro_f1") if "accuracy" in scores else ("precision", "recall", "f1")
    return f"step {scores['step']}: val_loss {scores['loss']:.4f}, " + ", ".join(f"{k} {scores[k]:.4f}" for k in keys)
