"""A training run on 1 process (in this one) or on N forked ranks, as the checkpoint and
classical-training tests compare them: the logged losses, the final validation loss and the
exported weights."""

from __future__ import annotations

from meshlm.artifacts.weights_file import load_weights
from meshlm.distributed.spawn import run_distributed
from meshlm.train.trainer import train


def quiet(*args, **kwargs) -> None:
    pass


def _train_rank(rank, cfg, out, resume):
    result = train(cfg, out, log=quiet, resume=resume)
    return result.losses, result.final_val_loss


def run_training(world, cfg, out, resume=None):
    """(losses, final val loss) of a run on `world` forked ranks (1: in this process); every
    rank must log the same losses."""
    if world == 1:
        return _train_rank(0, cfg, out, resume)
    results = run_distributed(_train_rank, world, cfg, out, resume)
    assert all(r == results[0] for r in results), "every rank must log the same losses"
    return results[0]


def final_weights(run, cfg):
    return load_weights(run / "model.safetensors", cfg.model).state_dict()
