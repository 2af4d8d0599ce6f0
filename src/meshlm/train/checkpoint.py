"""Sharded, resumable, verified training checkpoints (torch.distributed.checkpoint), and export.

In the trainer:

    point = find_resume_checkpoint(resume, run, env)    # "auto", a checkpoint or a run directory
    ckpt = Checkpointer(cfg, run, env, pm, runner)
    start = ckpt.load(point) if point else 0            # model, optimizer, step, RNG: any layout
    for step in range(start, steps):
        ... train_step(step) ...
        if ckpt.due(step + 1): ckpt.save(step + 1)      # every train.checkpoint_every steps and at the end
    ckpt.wait()                                         # an async save still writing

What is saved: every parameter and both AdamW moments under single-device names and shapes,
written by whichever ranks hold them, each region once (checkpoint_state.py explains the
resharding); the optimizer step count, the step (which is also the data-loader position and
the LR schedule's position: both are pure functions of the step), each rank's RNG state, the
config and the layout. Publication is atomic and verified (checkpoint_manifest.py).

Async (`train.async_checkpoint`): the save copies this rank's pieces to CPU memory (the only
time training is blocked), then dcp.async_save writes them from a background thread over a
dedicated gloo group (so its collectives never interleave with training's) while training goes
on; rank 0 publishes the checkpoint when every rank's data is on disk. A new save, and the end
of training, first wait for the previous one.

Fault tolerance: workers restarted by the elastic agent (`--max-restarts`) resume automatically
from the newest complete checkpoint (see Trainer). A save killed half-way leaves only a .tmp
directory, which is never loaded and is removed by the next save.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager

from meshlm.artifacts.run_dir import write_text_atomic
from meshlm.config import Config, ConfigError, config_from_dict
from meshlm.distributed.env import LaunchEnv
from meshlm.distributed.rank_zero import reported_once, run_on_rank0
from meshlm.train.checkpoint_manifest import (
    MANIFEST,
    CheckpointError,
    checkpoints_dir,
    fallback_hint,
    list_checkpoints,
    newest_valid,
    prune,
    publish,
    step_dir,
    verify_checkpoint,
)
from meshlm.train.checkpoint_state import (
    Box,
    BoxLoadPlanner,
    BoxSavePlanner,
    ShardContext,
    Sharded,
    checkpoint_key,
    global_shapes,
    optimizer_steps,
    rng_state,
    set_optimizer_steps,
    set_rng_state,
    training_state,
)
from meshlm.train.optim import lr_at
from meshlm.train.run_faults import check_room_for_checkpoint, checkpoint_bytes, failed_save_error
from meshlm.utils.disk import MiB, check_free_space
from meshlm.utils.paths import output_dir_problem

__all__ = [
    "Checkpointer",
    "ResumePoint",
    "find_resume_checkpoint",
    "resume_on_restart",
    "reopen_run_dir",
    "export_checkpoint",
    "CheckpointError",
    "verify_checkpoint",
    "list_checkpoints",
]


def _errors_in(error: BaseException) -> list[BaseException]:
    """`error` and, for torch's CheckpointException, the error of each rank it collected."""
    found = [error]
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        found += [v[0] for v in failures.values() if isinstance(v, tuple) and v and isinstance(v[0], BaseException)]
    return found


def _dcp_no_dist(no_dist: bool) -> bool:
    """A single process saves and loads without a process group; DCP warns each time that it
    assumes so (also from an async save's thread, hence a filter rather than catch_warnings)."""
    if no_dist:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return no_dist


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def find_resume_checkpoint(resume: str, run: Path, env: LaunchEnv, log=print) -> ResumePoint | None:
    """What `--resume` names, verified: "auto" is the newest complete checkpoint of `run`
    (broken ones are reported and skipped; None when there is none: start fresh); a run
    directory is its newest complete checkpoint; a checkpoint directory is itself, or an error
    naming the bad file. Rank 0 reads and checks; every rank gets the same answer or error."""

    def choose():
        if resume == "auto":
            found = newest_valid(run, log)
            if found is None:
                log(f"no complete checkpoint in {checkpoints_dir(run)}; starting from step 0")
            return found
        path = Path(resume)
        if checkpoints_dir(path).is_dir() and not (path / MANIFEST).exists():
            found = newest_valid(path, log)
            if found is None:
                raise CheckpointError(
                    f"{path} has no complete checkpoint to resume from (looked in {checkpoints_dir(path)})."
                )
            return found
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} {fallback_hint(path, 'resume')}") from None

    def answer():
        try:
            found = choose()
        except (ConfigError, OSError, ValueError) as e:  # reported on every rank, not just this one
            raise CheckpointError(str(e)) from None
        return (str(found[0]), found[1]) if found else None

    found = run_on_rank0(answer, env.distributed)
    return ResumePoint(Path(found[0]), found[1]) if found else None


def resume_on_restart(resume: str | None, run: Path) -> str | None:
    """What a worker restarted by the elastic agent resumes from: this run's newest complete
    checkpoint once it has one (whatever --resume first said), else the original --resume."""
    return "auto" if list_checkpoints(run) or not resume else resume


def reopen_run_dir(out: Path, cfg: Config, step: int) -> None:
    """The run directory of a resumed run: the config (re)written, metrics.jsonl kept up to the
    checkpoint's step (the steps after it are trained again and logged anew)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", cfg.to_toml())
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:  # a line cut short by the crash
                pass
        write_text_atomic(metrics, "".join(kept))


class _StageToCPU(AsyncStager):
    """Copies the pieces to CPU memory; after this, training may change the live tensors."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return {k: v.staged() if isinstance(v, Sharded) else copy.deepcopy(v) for k, v in state_dict.items()}

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _layout(pm) -> dict:
    d = pm.dims
    return {
        "dp": d.dp,
        "dp_replicate": d.dp_replicate,
        "dp_shard": d.dp_shard,
        "zero": d.zero,
        "tp": d.tp,
        "pp": d.pp,
        "sequence_parallel": d.sequence_parallel,
        "describe": d.describe,
    }


class Checkpointer:
    """Saves and loads this rank's part of the training state; every call is collective."""

    def __init__(self, cfg: Config, run: Path, env: LaunchEnv, pm, runner, log=print, record: Config | None = None):
        """record: the config a checkpoint records (its config.toml, the manifest's config and
        fingerprint, what a resume is checked against) when it is not `cfg`: a task run records
        its own config ([task] and the backbone's [model]), from which its model is derived."""
        self.cfg, self.run, self.env, self.pm, self.runner, self.log = cfg, Path(run), env, pm, runner, log
        self.record = record or cfg
        tp_rank = pm.dims.coordinates(env.rank)["tp"] if env.distributed else 0
        self.ctx = ShardContext(cfg.model, pm.dims.tp, tp_rank, global_shapes(cfg.model))
        self._group = None
        self._pending: tuple[Future, int, int] | None = None  # (done, step, bytes needed)
        self.blocked_s: list[float] = []  # how long each save held up training (benchmarks)

    @property
    def group(self):
        """A gloo group for checkpoint collectives, created on first use (collectively)."""
        if self._group is None and self.env.distributed:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier(group=self.group)

    def due(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    # ------------------------------------------------------------------ save

    def save(self, step: int, files: Callable[[Path], None] | None = None) -> None:
        """Checkpoint the state after `step` training steps into checkpoints/step-NNNNNN/.
        DiskFullError (on every rank) when there is no room for it, before or while writing.
        files: called on rank 0 with the checkpoint's directory before it is published, to add
        the caller's own files (fine-tuning's best model and early-stopping state)."""
        started = time.perf_counter()
        self.wait()
        final = step_dir(self.run, step)
        tmp = final.with_name(final.name + ".tmp")
        need = checkpoint_bytes(self.cfg, self.run)

        def start() -> None:  # rank 0: room for it, then the directory and the small files
            check_room_for_checkpoint(self.cfg, self.run, step, need)
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                (tmp / "config.toml").write_text(self.record.to_toml())
                if (self.run / "tokenizer.json").is_file():
                    shutil.copyfile(self.run / "tokenizer.json", tmp / "tokenizer.json")
                if files is not None:
                    files(tmp)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise failed_save_error(e, self.cfg, self.run, step, need) from None

        run_on_rank0(start, self.env.distributed)
        state: dict = training_state(self.pm, self.runner, self.ctx, for_load=False)
        state[f"rng/{self.env.rank}"] = rng_state(self.env.device)
        info = {
            "step": step,
            "optimizer_steps": optimizer_steps(self.runner),
            "world_size": self.env.world_size,
            "layout": _layout(self.pm),
            "config_hash": self.record.fingerprint(),
            "config": self.record.to_dict(),
            "next_lr": lr_at(step, self.cfg.train) if step < self.cfg.train.steps else None,
            "data_position": {"next_step": step, "seed": self.cfg.train.seed},
            "torch": torch.__version__,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        writer = FileSystemWriter(tmp, thread_count=1)
        no_dist = _dcp_no_dist(not self.env.distributed)
        if self.cfg.train.async_checkpoint:
            upload = dcp.async_save(
                state,
                storage_writer=writer,
                planner=BoxSavePlanner(),
                process_group=self.group,
                async_stager=_StageToCPU(),
                no_dist=no_dist,
            )
            done: Future = Future()

            def finish(f: Future) -> None:  # in the writer thread: every rank's data is on disk
                try:
                    f.result()
                    if self.env.is_main:
                        self._publish(tmp, final, info)
                    done.set_result(None)
                except BaseException as e:  # re-raised by wait()
                    if self.env.is_main:
                        shutil.rmtree(tmp, ignore_errors=True)
                    done.set_exception(e)

            upload.add_done_callback(finish)
            self._pending = (done, step, need)
        else:
            try:
                dcp.save(
                    state, storage_writer=writer, planner=BoxSavePlanner(), process_group=self.group, no_dist=no_dist
                )
            except (Exception, CheckpointException) as e:  # every rank gets the failure of any rank's write
                if self.env.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                error = failed_save_error(e, self.cfg, self.run, step, need)
                if error is e:
                    raise
                raise reported_once(error, self.env.rank) from None
            self._barrier()
            run_on_rank0(lambda: self._publish_or_clean(tmp, final, info, need), self.env.distributed)
        self.blocked_s.append(time.perf_counter() - started)

    def _publish_or_clean(self, tmp: Path, final: Path, info: dict, need: int) -> None:
        try:
            self._publish(tmp, final, info)
        except OSError as e:  # the manifest did not fit: the directory stays a .tmp, which is removed
            shutil.rmtree(tmp, ignore_errors=True)
            raise failed_save_error(e, self.cfg, self.run, info["step"], need) from None

    def _publish(self, tmp: Path, final: Path, info: dict) -> None:
        publish(tmp, final, info)
        removed = prune(self.run, self.cfg.train.keep_checkpoints, keep_paths=(final,))
        self.log(f"checkpoint {final}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))

    def wait(self) -> None:
        """Block until an async save in flight is published; re-raise its error."""
        if self._pending is not None:
            done, step, need = self._pending
            self._pending = None
            try:
                done.result()
            except (Exception, CheckpointException) as e:
                error = failed_save_error(e, self.cfg, self.run, step, need)
                if error is not e:
                    raise reported_once(error, self.env.rank) from None
                raise CheckpointError(f"the asynchronous save of step {step} failed: {e}") from e

    # ------------------------------------------------------------------ load

    def load(self, point: ResumePoint) -> int:
        """Load a verified checkpoint into the model and optimizer of this layout; returns its step."""
        manifest = point.manifest
        saved = manifest.get("config", {}).get("model")
        mine = self.record.to_dict()["model"]
        if saved != mine:
            diff = sorted(k for k in mine if (saved or {}).get(k) != mine[k])
            raise CheckpointError(
                f"checkpoint {point.path} was written for a different model (model.{', model.'.join(diff)} "
                f"differ); resume with the config it was trained with."
            )
        if manifest.get("config_hash") != self.record.fingerprint():
            self.log(
                f"note: {point.path} was written with different training settings (seed, lr, steps or batch); "
                f"the resumed run will not reproduce the original one"
            )
        state: dict = training_state(self.pm, self.runner, self.ctx, for_load=True)
        rng_key = f"rng/{self.env.rank}"
        same_world = manifest.get("world_size") == self.env.world_size
        if same_world:
            state[rng_key] = None
        planner = BoxLoadPlanner()
        try:
            dcp.load(
                state,
                storage_reader=FileSystemReader(point.path),
                planner=planner,
                process_group=self.group,
                no_dist=_dcp_no_dist(not self.env.distributed),
            )
        except (Exception, CheckpointException) as e:  # DCP wraps each rank's error: report ours by name
            refused = next((inner for inner in _errors_in(e) if isinstance(inner, ConfigError)), None)
            if refused is not None:
                raise CheckpointError(f"checkpoint {point.path}: {refused}") from None
            raise
        set_optimizer_steps(self.runner, int(manifest["optimizer_steps"]))
        if hasattr(self.runner, "load_extra_state"):  # L-BFGS's history (meshlm.train.full_batch)
            self.runner.load_extra_state({k: planner.loaded[k] for k in self.runner.extra_state()})
        if same_world:
            set_rng_state(planner.loaded[rng_key], self.env.device)
        layout = manifest.get("layout", {}).get("describe", "?")
        self.log(
            f"resumed from {point.path} at step {point.step} (saved by {manifest.get('world_size')} process(es), "
            f"layout {layout})"
        )
        return point.step


# ----------------------------------------------------------------------------- export


def export_checkpoint(run: Path, out: Path, step: int | None = None, log=print) -> Path:
    """Consolidate a sharded checkpoint of `run` (the newest complete one, or step `step`) into
    OUT/model.safetensors + config.toml + tokenizer.json, the files `meshlm generate --run OUT`
    loads. One process; works for a checkpoint written by any layout."""
    from meshlm.artifacts.weights_file import save_weights, weights_bytes

    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise CheckpointError(
            f"run directory {run} does not exist{' (it is a file)' if run.exists() else ''}. Pass the --out "
            f"directory of `meshlm train` as --run."
        )
    problem = output_dir_problem(out)
    if problem:
        raise ConfigError(f"cannot write the export: {problem}. Choose another --out.")
    if step is None:
        found = newest_valid(run, log)
        if found is None:
            have = "its checkpoints are all damaged or incomplete" if list_checkpoints(run) else "it has none"
            raise CheckpointError(
                f"{run} has no complete checkpoint to export ({have}; looked in {checkpoints_dir(run)}). Checkpoints "
                f"are written with --set train.checkpoint_every=N; a finished run's model.safetensors needs no export."
            )
        path, manifest = found
    else:
        path = step_dir(run, step)
        if not path.is_dir():
            have = ", ".join(str(s) for s, _ in list_checkpoints(run)) or "none"
            raise CheckpointError(f"{run} has no checkpoint of step {step} (steps available: {have}).")
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} {fallback_hint(path, 'export')}") from None
    cfg = config_from_dict(manifest["config"], source=f"{path}/{MANIFEST}")
    state = {
        f"model/{name}": Sharded(size, [Box((0,) * len(size), torch.empty(size))])
        for name, size in global_shapes(cfg.model).items()
        if checkpoint_key(name, cfg.model) == name
    }
    dcp.load(state, storage_reader=FileSystemReader(path), planner=BoxLoadPlanner(), no_dist=_dcp_no_dist(True))
    weights = {key.removeprefix("model/"): value.boxes[0].data for key, value in state.items()}
    tokenizer = next((p for p in (path / "tokenizer.json", run / "tokenizer.json") if p.is_file()), None)
    if tokenizer is None:
        raise CheckpointError(f"neither {path} nor {run} holds tokenizer.json; cannot export a usable model.")
    check_free_space(
        out / "model.safetensors", weights_bytes(weights) + MiB, "Free some space or choose another --out."
    )
    out.mkdir(parents=True, exist_ok=True)
    save_weights(weights, cfg.model, out / "model.safetensors")
    write_text_atomic(out / "config.toml", cfg.to_toml())
    if tokenizer.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    log(f"exported {path} (step {manifest['step']}) to {out / 'model.safetensors'}")
    return out
