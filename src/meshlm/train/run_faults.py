"""What training does when the machine or the numbers fail it: a disk too full for the next
checkpoint or the final weights, and a step whose loss or gradient norm is not finite.

The rules (docs/reliability.md):

- Before training, the run directory must have room for the final weights (and one checkpoint
  when checkpoints are on); before each save, room for that checkpoint (the previous one's size,
  or an estimate for the first). A save that runs out of space anyway is removed (its .tmp
  directory) and reported as "disk full at PATH: need N MiB, M free"; the previous checkpoint
  is never touched (old checkpoints are pruned only after a new one is published).
- The final weights are never simply lost: when model.safetensors does not fit, the message
  names the final checkpoint (which holds them, and `meshlm export` turns into the model file),
  or, with no such checkpoint, the weights are written to the system's temporary directory.
- A non-finite step never changes the weights (StepRunner skips its update); training stops at
  the first one, or after train.skip_nonfinite_steps of them, naming the step and the newest
  checkpoint to resume from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from meshlm.artifacts.run_dir import write_text_atomic
from meshlm.artifacts.weights_file import save_weights, weights_bytes
from meshlm.config import Config
from meshlm.model.stats import count_params
from meshlm.train.checkpoint_manifest import list_checkpoints, step_dir
from meshlm.utils.disk import check_free_space, disk_full_message, out_of_space
from meshlm.utils.errors import DiskFullError, RunError

# Besides the tensors: the safetensors header (~100 bytes per tensor); for a checkpoint, DCP's
# metadata and per-tensor records, config.toml and a copy of tokenizer.json (added separately).
_WEIGHTS_EXTRA = 64 * 1024
_CHECKPOINT_EXTRA = 256 * 1024


def final_weights_bytes(cfg: Config) -> int:
    return 4 * count_params(cfg.model) + _WEIGHTS_EXTRA


# float32 copies of the parameters a first checkpoint holds, by train.optimizer: the weights,
# plus AdamW's two moments; SGD and EM keep nothing per parameter; L-BFGS after one step keeps
# its direction and its last gradient (measured: 3.2 copies with the metadata); later L-BFGS
# checkpoints grow with the history and are checked against the previous one's size.
_COPIES = {"adamw": 3, "sgd": 1, "em": 1, "lbfgs": 3}


def checkpoint_bytes(cfg: Config, run: Path) -> int:
    """Bytes the next checkpoint of `run` will take: the newest published one's size, else an
    estimate (each float32 parameter and the optimizer's copies of it, the tokenizer, metadata)."""
    published = list_checkpoints(run)
    if published:
        size = sum(p.stat().st_size for p in published[-1][1].rglob("*") if p.is_file())
        if size:
            return size
    tokenizer = run / "tokenizer.json"
    return (
        _COPIES.get(cfg.train.optimizer, 3) * 4 * count_params(cfg.model)
        + _CHECKPOINT_EXTRA
        + (tokenizer.stat().st_size if tokenizer.is_file() else 0)
    )


def check_room_to_start(cfg: Config, out: Path) -> None:
    """DiskFullError before any step when the run directory cannot even hold the final weights
    (each checkpoint is checked before its own save)."""
    check_free_space(
        out,
        final_weights_bytes(cfg),
        "This run writes its final weights there. Free some space or choose another --out before training.",
    )


def previous_checkpoint_note(run: Path, failed_step: int | None = None) -> str:
    """What is kept: the newest published checkpoint (never touched by a failed save)."""
    kept = [(s, p) for s, p in list_checkpoints(run) if s != failed_step]
    if not kept:
        return "No earlier checkpoint exists."
    step, path = kept[-1]
    return f"The previous checkpoint {path} (step {step}) is intact; `--resume auto` continues from it."


def check_room_for_checkpoint(cfg: Config, run: Path, step: int, need: int) -> None:
    check_free_space(
        step_dir(run, step),
        need,
        f"The checkpoint of step {step} was not written. {previous_checkpoint_note(run, step)} Free some space (or "
        f"lower train.keep_checkpoints: {cfg.train.keep_checkpoints} are kept, and a new one is written before the "
        f"oldest is removed), then continue with --resume auto.",
    )


def failed_save_error(error: BaseException, cfg: Config, run: Path, step: int, need: int) -> BaseException:
    """The error to raise for a checkpoint save that failed with `error`: DiskFullError when it
    ran out of space, else `error` itself."""
    path = step_dir(run, step)
    if not out_of_space(error, path, need):
        return error
    return DiskFullError(
        f"{disk_full_message(path, need)} Writing the checkpoint of step {step} ran out of space; its partial "
        f"files were removed. {previous_checkpoint_note(run, step)} Free some space (or lower "
        f"train.keep_checkpoints), then continue with --resume auto."
    )


def nonfinite_error(cfg: Config, run: Path, step: int, loss: float, grad_norm: float, skipped: int) -> RunError:
    allowed = cfg.train.skip_nonfinite_steps
    counted = (
        f" after {skipped - 1} skipped non-finite step(s) (train.skip_nonfinite_steps = {allowed})" if allowed else ""
    )
    published = list_checkpoints(run)
    resume = (
        f"The newest checkpoint is {published[-1][1]} (step {published[-1][0]}); `--resume auto` continues from it."
        if published
        else "No checkpoint was written (train.checkpoint_every = 0), so a rerun starts from step 0."
    )
    t = cfg.train
    if t.optimizer == "lbfgs":  # a full-pass method: no learning rate or clipping to lower
        fix = f"Raise train.lbfgs_l2 (now {t.lbfgs_l2}) or check the data"
    elif t.optimizer == "em":
        fix = f"Raise train.em_smoothing (now {t.em_smoothing}) or check the data"
    else:
        fix = f"Lower train.lr (now {t.lr}), keep train.grad_clip on (now {t.grad_clip})"
    return RunError(
        f"training stopped at step {step}{counted}: the loss is {loss} and the gradient norm {grad_norm}, which are "
        f"not finite; this step's update was not applied. {resume} {fix}, or let meshlm skip such steps with "
        f"--set train.skip_nonfinite_steps=N."
    )


def save_final_weights(state: dict[str, torch.Tensor], cfg: Config, out: Path, steps: int) -> None:
    """model.safetensors, or a DiskFullError that says where the trained weights are kept
    (`cfg.model` describes `state`: a task run passes its derived task-model config)."""
    path = out / "model.safetensors"
    need = weights_bytes(state, cfg.model) + _WEIGHTS_EXTRA
    try:
        check_free_space(path, need)
        save_weights(state, cfg.model, path)
        return
    except (DiskFullError, OSError) as e:
        if not isinstance(e, DiskFullError) and not out_of_space(e, path, need):
            raise
    final = step_dir(out, steps)
    if final.is_dir():
        raise DiskFullError(
            f"{disk_full_message(path, need)} The trained weights are kept in the final checkpoint {final}. Free "
            f"some space, then write the model file with `meshlm export --run {out} --out {out}`."
        ) from None
    rescue = _rescue(state, cfg, out)
    where = (
        f"The trained weights were written to {rescue} instead (model.safetensors with config.toml and "
        f"tokenizer.json: `meshlm generate --run {rescue}` loads it); free some space and move them into {out}."
        if rescue
        else "The temporary directory is full too, so the trained weights could not be kept; next time set "
        "train.checkpoint_every so that the run keeps checkpoints."
    )
    raise DiskFullError(f"{disk_full_message(path, need)} {where}") from None


def _rescue(state: dict[str, torch.Tensor], cfg: Config, out: Path) -> Path | None:
    """The weights, config and tokenizer in a fresh folder of the temporary directory, or None."""
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"meshlm-rescued-{out.name}-"))
        save_weights(state, cfg.model, folder / "model.safetensors")
        # The run's own config.toml when it has one (a task run's records its [task] section).
        if (out / "config.toml").is_file():
            shutil.copyfile(out / "config.toml", folder / "config.toml")
        else:
            write_text_atomic(folder / "config.toml", cfg.to_toml())
        if (out / "tokenizer.json").is_file():
            shutil.copyfile(out / "tokenizer.json", folder / "tokenizer.json")
        return folder
    except OSError:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return None
