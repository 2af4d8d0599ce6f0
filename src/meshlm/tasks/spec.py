"""The FamilySpec of a task model, derived from its backbone family's spec.

Same blocks and first-stage modules, under "backbone."; the last stage keeps the backbone's
final modules except its output layer (the spec's last_stage[-1]) and adds the head; the
tensor-parallel plan keeps the backbone's entries except the vocabulary output (and its region
entrance): the head is replicated and reads hidden states that are whole on every tp rank, so
its gradient needs no reduction and the backbone's regions reduce theirs as in language
modelling. Sequence parallelism is refused (the head and the pooling read every position).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshlm.config import Config, ConfigError, ModelConfig
from meshlm.model.registry import family_spec, meta_model
from meshlm.model.spec import FamilySpec, StageCosts, TensorParallelPlan
from meshlm.tasks.config import TaskRunConfig
from meshlm.tasks.task_model import TaskModel


@dataclass
class TaskModelConfig(ModelConfig):
    """The [model] of a task model, in memory: the backbone's section and the head's shape. Its
    family name reads "<backbone family>+<task>"; `derived_spec()` answers for the registry."""

    backbone: ModelConfig | None = None
    task: str = "classify"
    n_labels: int = 2
    crf: bool = False
    dropout: float = 0.0
    ngram_buckets: int = 0  # hashed n-gram embeddings (ngrams.py); 0 = none
    ngram_dim: int = 16
    ngram_orders: int = 3

    def __post_init__(self) -> None:
        if self.backbone is not None:
            self.family = f"{self.backbone.family}+{self.task}"
            self.vocab_size, self.max_seq_len = self.backbone.vocab_size, self.backbone.max_seq_len

    @property
    def predicate(self) -> bool:
        """Whether the input carries a predicate indicator per token (srl)."""
        return self.task == "srl"

    def derived_spec(self):
        return task_spec(self)

    def validate(self) -> None:
        self.backbone.validate()
        if self.n_labels < 1:
            raise ConfigError("a task model needs at least one label; the training data has none.")
        if self.ngram_buckets and (self.vocab_size + 1) ** self.ngram_orders >= 2**62:
            raise ConfigError(
                f"'task.ngram_orders' = {self.ngram_orders} is too high for a vocabulary of {self.vocab_size}: the "
                f"n-gram hash would overflow 64-bit integers. Lower task.ngram_orders, or set task.ngram_buckets=0."
            )


def task_model_config(cfg: TaskRunConfig) -> TaskModelConfig:
    t = cfg.task
    return TaskModelConfig(
        backbone=cfg.model,
        task=t.name,
        n_labels=len(t.labels),
        crf=t.crf,
        dropout=t.dropout,
        ngram_buckets=t.ngram_buckets,
        ngram_dim=t.ngram_dim,
        ngram_orders=t.ngram_orders,
    )


def with_task_model(cfg: TaskRunConfig) -> Config:
    """The Config that parallelize, the step and the checkpoints see: [model] is the task model."""
    return dataclasses.replace(cfg, model=task_model_config(cfg))


PREFIX = "backbone."
_SPECS: dict[str, FamilySpec] = {}


def _head_params(cfg: TaskModelConfig) -> int:
    """Parameters outside the backbone that compute per token: the head, the predicate embedding
    and the n-gram projection (the n-gram table is a lookup: memory, not work)."""
    model = meta_model(cfg)
    extra = [model.head] + ([model.predicate_embedding] if model.predicate_embedding is not None else [])
    extra += [model.ngram_embedding.proj] if model.ngram_embedding is not None else []
    return sum(p.numel() for m in extra for p in m.parameters())


def task_spec(cfg: TaskModelConfig) -> FamilySpec:
    key = repr(cfg)
    if key not in _SPECS:
        _SPECS[key] = _derive(cfg)
    return _SPECS[key]


def _derive(cfg: TaskModelConfig) -> FamilySpec:
    base = family_spec(cfg.backbone)
    output = base.last_stage[-1]

    def tp_plan(c: TaskModelConfig) -> TensorParallelPlan | None:
        plan = base.tp_plan(c.backbone)
        if plan is None:
            return None
        styles = {PREFIX + k: v for k, v in plan.styles.items() if v != "vocab_output"}
        regions = tuple(PREFIX + r for r in plan.regions if plan.styles.get(r) != "vocab_output")
        halves = {PREFIX + k: v for k, v in plan.halves.items()}
        return TensorParallelPlan(styles, regions, halves, sequence_parallel=False)

    def count_params(c: TaskModelConfig) -> int:
        return len_unique(meta_model(c))

    def flops_per_token(c: TaskModelConfig, seq_len: int, training: bool) -> float:
        out = sum(p.numel() for p in meta_model(c.backbone).get_submodule(output).parameters())
        return base.flops_per_token(c.backbone, seq_len, training) + 2 * (3 if training else 1) * (
            _head_params(c) - out
        )

    def stage_costs(c: TaskModelConfig) -> StageCosts:
        costs = base.stage_costs(c.backbone)
        return StageCosts(costs.first, costs.blocks, float(_head_params(c)))

    capabilities = dataclasses.replace(
        base.capabilities,
        sequence_parallel="a task head reads every position of the sequence (pooling, tag decoding); "
        "set parallel.sequence_parallel=false",
    )
    return FamilySpec(
        name=cfg.family,
        config_type=TaskModelConfig,
        model_class=TaskModel,
        blocks=PREFIX + base.blocks,
        first_stage=tuple(PREFIX + n for n in base.first_stage)
        + (("predicate_embedding",) if cfg.predicate else ())
        + (("ngram_embedding",) if cfg.ngram_buckets else ()),
        last_stage=tuple(PREFIX + n for n in base.last_stage[:-1]) + ("head",),
        capabilities=capabilities,
        tp_problem=lambda c, tp: base.tp_problem(c.backbone, tp),
        tp_plan=tp_plan,
        tied=lambda c: None,  # the output layer a backbone ties to its embedding is gone
        count_params=count_params,
        flops_per_token=flops_per_token,
        stage_costs=stage_costs,
        describe=lambda c: (
            f"{c.task} head ({c.n_labels} labels{', CRF' if c.crf else ''}"
            f"{f', {c.ngram_buckets} n-gram buckets' if c.ngram_buckets else ''}) on {base.describe(c.backbone)}"
        ),
    )


def len_unique(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
