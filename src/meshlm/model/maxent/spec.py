"""The maxent family's spec: what parallelism, checkpoints, inference and the planner need to
know about `model.py`, as data."""

from __future__ import annotations

from meshlm.model.maxent.config import MaxEntConfig
from meshlm.model.maxent.decode import NgramDecodeState
from meshlm.model.maxent.model import MaxEntLM
from meshlm.model.spec import Capabilities, FamilySpec, StageCosts, TensorParallelPlan


def count_params(cfg: MaxEntConfig) -> int:
    return (cfg.order - 1) * cfg.hash_rows * cfg.vocab_size + cfg.vocab_size


def flops_per_token(cfg: MaxEntConfig, seq_len: int, training: bool = True) -> float:
    """No matrix multiply: n-1 table rows of V added to the bias, then the softmax (about 4 V
    more: max, subtract, exp, sum); 2 FLOPs per addition-and-exp are counted as one multiply-add.
    Backward scatters the same rows: x3 for training, as for every family."""
    forward = 2 * (cfg.order - 1) * cfg.vocab_size + 4 * cfg.vocab_size
    return 3 * forward if training else forward


def stage_costs(cfg: MaxEntConfig) -> StageCosts:
    return StageCosts(first=0, blocks=[cfg.vocab_size] * (cfg.order - 1), last=cfg.vocab_size)


def tp_plan(cfg: MaxEntConfig) -> TensorParallelPlan:
    """Vocabulary-parallel: every table is split by vocabulary columns, so each rank scores its
    slice of the vocabulary and the softmax normaliser is the vocabulary-parallel loss's all-reduce."""
    return TensorParallelPlan({"unigram": "vocab_columns", "orders.*": "vocab_columns"}, sequence_parallel=False)


def describe(cfg: MaxEntConfig) -> str:
    return f"{cfg.order}-gram log-linear, {cfg.hash_rows} hashed rows per history length"


SPEC = FamilySpec(
    name="maxent",
    config_type=MaxEntConfig,
    model_class=MaxEntLM,
    blocks="orders",
    first_stage=(),
    last_stage=("unigram",),
    capabilities=Capabilities(
        sequence_parallel="its vocabulary-parallel tables leave no hidden states to split along the sequence",
        pipeline="a log-linear model is one layer of feature weights, with no stack of blocks to cut into stages",
    ),
    tp_problem=lambda cfg, tp: None,
    tp_plan=tp_plan,
    tied=lambda cfg: None,
    count_params=count_params,
    flops_per_token=flops_per_token,
    stage_costs=stage_costs,
    describe=describe,
    decode_state=NgramDecodeState,
)
