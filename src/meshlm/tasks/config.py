"""A task run's configuration: the usual sections ([model] is the backbone's) plus [task]. The
in-memory [model] of the task model itself (backbone + head) is spec.TaskModelConfig."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meshlm.config import Config, ConfigError, apply_overrides, config_from_dict, validate

TASKS = ("classify", "ner", "srl")
TaskName = Literal["classify", "ner", "srl"]


@dataclass
class TaskSettings:
    """The [task] section of a task run."""

    name: TaskName = "classify"
    # The label set, in head order: classes (classify) or IOB2 tags (ner, srl). Filled from the
    # training data by `meshlm finetune`; a prediction can only produce these.
    labels: list[str] = field(default_factory=list)
    # The tag scheme of the training file (IOB1, IOB2 or BIOES): tags are normalised to IOB2 for
    # training and written back in this scheme by predict.
    scheme: str = "IOB2"
    # classify: how the per-position scores become one: the mean over the text's tokens, or the
    # score at its last token (the end-of-text token appended to each text).
    pooling: Literal["mean", "last"] = "mean"
    # ner, srl: a CRF output layer (transition scores, Viterbi decoding) over the per-word scores.
    crf: bool = False
    dropout: float = 0.1
    # Hashed n-gram embeddings beside the backbone (tasks/ngrams.py: fastText's bag of token
    # 1..ngram_orders-grams, hashed into ngram_buckets rows of width ngram_dim, added to the
    # backbone's output before the head). 0 = none; `meshlm finetune` turns them on for classify
    # (finetune.TASK_DEFAULTS).
    ngram_buckets: int = 0
    ngram_dim: int = 16
    ngram_orders: int = 3
    # Passes over the training data; 0 = run train.steps steps instead.
    epochs: float = 4.0
    # Stop after this many evaluations without a better validation score (0 = never early); the
    # best evaluated model is the one kept either way.
    patience: int = 0
    # A checkpoint (the training state, the best model so far, the early-stopping count) after
    # every validation but the last, in OUT/checkpoints/, so that `meshlm finetune ... --resume
    # auto` continues an interrupted run exactly; train.checkpoint_every adds more.
    checkpoints: bool = True
    # Where the backbone came from (a run directory, a Hugging Face directory, or "default").
    backbone: str = ""

    def validate(self) -> None:
        if self.epochs < 0 or self.patience < 0:
            raise ConfigError(f"'task.epochs' ({self.epochs}) and 'task.patience' ({self.patience}) must be >= 0.")
        if self.ngram_buckets < 0 or self.ngram_dim < 1 or self.ngram_orders < 1:
            raise ConfigError(
                f"'task.ngram_buckets' ({self.ngram_buckets}) must be >= 0 (0 = no n-gram embeddings), "
                f"'task.ngram_dim' ({self.ngram_dim}) and 'task.ngram_orders' ({self.ngram_orders}) >= 1."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'task.dropout' must be in [0, 1), got {self.dropout}.")
        if self.crf and self.name == "classify":
            raise ConfigError("'task.crf' is for tagging (ner, srl); a classifier has no tag sequence to decode.")


@dataclass
class TaskRunConfig(Config):
    task: TaskSettings = field(default_factory=TaskSettings)


def load_task_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> TaskRunConfig:
    """A task run's config.toml (or any TOML with a [task] section), then `--set` overrides."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not a readable TOML file ({e}).") from None
    cfg = config_from_dict(raw, source=str(path), config_type=TaskRunConfig)
    apply_overrides(cfg, overrides)
    return cfg


def validate_task_config(cfg: TaskRunConfig) -> None:
    validate(cfg)
    cfg.task.validate()


def is_task_run(run: Path | str) -> bool:
    """Whether a directory holds a task model (its config.toml has a [task] section)."""
    path = Path(run) / "config.toml"
    if not path.is_file():
        return False
    try:
        return "task" in tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
