"""Finding and loading a model for inference: a run directory or a checkpoint file, on one
process or split over a tensor-parallel group; and the process layout of the inference
commands (data-parallel groups of tensor-parallel ranks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from meshlm.artifacts.run_dir import load_run_config
from meshlm.artifacts.weights_file import load_weights
from meshlm.config import Config, ConfigError, check_left_to_right
from meshlm.data.tokenizer import load_tokenizer
from meshlm.distributed.dims import ParallelDims
from meshlm.distributed.env import LaunchEnv
from meshlm.distributed.rank_zero import broadcast_from_rank0
from meshlm.model.tp_rules import check_tp_divides

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for inference, with the run config and tokenizer it came with."""

    cfg: Config
    model: nn.Module
    tokenizer: tokenizers.Tokenizer


@dataclass(frozen=True)
class ModelFiles:
    config: Path
    weights: Path
    tokenizer: Path


def find_model_files(run: str | Path | None = None, checkpoint: str | Path | None = None) -> ModelFiles:
    """--run DIR: DIR/{config.toml, model.safetensors, tokenizer.json}. --checkpoint PATH: a
    .safetensors file (or a directory holding model.safetensors) with config.toml and
    tokenizer.json next to it or in a directory above it (a checkpoint inside a run).

    Every language-model inference path (generate, predict, eval, serve, and their Python
    API) finds its model here, before any work: a model that sees right context (a tagger's
    backbone option, ModelConfig.RIGHT_CONTEXT) is refused here, once for all of them."""
    files = _find_model_files(run, checkpoint)
    check_left_to_right(load_run_config(files.config.parent).model, "generation and language-model evaluation")
    return files


def _find_model_files(run: str | Path | None, checkpoint: str | Path | None) -> ModelFiles:
    if (run is None) == (checkpoint is None):
        raise ConfigError("pass exactly one of --run DIR and --checkpoint PATH.")
    if run is not None:
        run = Path(run)
        load_run_config(run)  # the clear "not a meshlm run directory" error
        tok = run / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(
                f"{run} has no tokenizer.json; it is not a finished run. Train it to the end or export a checkpoint."
            )
        return ModelFiles(run / "config.toml", run / "model.safetensors", tok)
    path = Path(checkpoint)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(
            f"checkpoint {weights} not found. Pass a model.safetensors file (or the directory holding it)."
        )
    found = {}
    for name in ("config.toml", "tokenizer.json"):
        for folder in [weights.parent, *list(weights.parent.parents)[:2]]:
            if (folder / name).is_file():
                found[name] = folder / name
                break
        else:
            raise ConfigError(
                f"no {name} next to checkpoint {weights} (nor in the two directories above it). "
                f"Put the run's config.toml and tokenizer.json beside the weights."
            )
    return ModelFiles(found["config.toml"], weights, found["tokenizer.json"])


def load_model(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tp_group: ProcessGroup | None = None,
    verify: bool = True,
) -> LoadedModel:
    """The model in eval mode on `device`; with a TP group of more than one rank, this rank's
    shard (every rank reads the full file and keeps its slices). The file is checked against
    its manifest (`verify=False`: its size only, not its sha256)."""
    cfg = load_run_config(files.config.parent)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    model = load_weights(files.weights, cfg.model, "cpu", verify=verify)
    if tp > 1:
        from meshlm.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, tp_group, sequence_parallel=False)
    model = model.to(device=device).eval()
    for p in model.parameters():  # parameters only: derived buffers (e.g. rotary tables) stay float32
        p.data = p.data.to(dtype)
        p.requires_grad_(False)
    return LoadedModel(cfg, model, load_tokenizer(files.tokenizer))


# ----------------------------------------------------------------------------- layout


@dataclass
class InferenceLayout:
    """world = dp x tp ranks, tp innermost: rank = dp_rank * tp + tp_rank. Global rank 0
    reads the input and writes the output; tp rank 0 of each group samples for its group."""

    env: LaunchEnv
    tp: int
    dp: int
    dp_rank: int
    tp_rank: int
    tp_group: ProcessGroup | None

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def check_layout(world: int, tp: int, model_cfg=None) -> None:
    if tp < 1 or world < 1:
        raise ConfigError(f"--nproc and --tp must be at least 1 (got nproc {world}, tp {tp}).")
    if world % tp:
        raise ConfigError(
            f"--nproc ({world}) must be a multiple of --tp ({tp}): the processes form nproc / tp "
            f"data-parallel groups of tp tensor-parallel ranks."
        )
    if model_cfg is not None:
        check_tp_divides(model_cfg, tp)


def setup_layout(env: LaunchEnv, tp: int) -> InferenceLayout:
    """Create the process group (if launched on several ranks) and the tp groups."""
    from meshlm.distributed.process_group import init_distributed

    check_layout(env.world_size, tp)
    init_distributed(env)
    dp = env.world_size // tp
    dims = ParallelDims(env.world_size, dp_replicate=1, dp_shard=dp, tp=tp, pp=1)
    group = dims.build_mesh(env.device.type).group("tp") if env.world_size > 1 and tp > 1 else None
    coords = dims.coordinates(env.rank)
    return InferenceLayout(env, tp, dp, coords["dp"], coords["tp"], group)


def broadcast_object(obj, layout: InferenceLayout):
    """Global rank 0's `obj` on every rank."""
    return broadcast_from_rank0(obj, layout.env.world_size > 1)
