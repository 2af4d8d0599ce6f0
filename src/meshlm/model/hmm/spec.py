"""The hmm family's spec: what parallelism, checkpoints, EM, inference and the planner need to
know about `model.py`, as data."""

from __future__ import annotations

from meshlm.model.hmm import em
from meshlm.model.hmm.config import HMMConfig
from meshlm.model.hmm.decode import FilterDecodeState
from meshlm.model.hmm.model import HMMLM
from meshlm.model.spec import Capabilities, EMHooks, FamilySpec, StageCosts, TensorParallelPlan


def count_params(cfg: HMMConfig) -> int:
    S = cfg.n_states
    return S + S * S + S * cfg.vocab_size


def flops_per_token(cfg: HMMConfig, seq_len: int, training: bool = True) -> float:
    """A filter step is a (S) x (S, S) product, the next-token logits a (S) x (S, V) one: 2 FLOPs
    per multiply-add; x3 for gradient training (EM's pass costs about the same as training)."""
    S = cfg.n_states
    forward = 2 * S * S + 2 * S * cfg.vocab_size
    return 3 * forward if training else forward


def stage_costs(cfg: HMMConfig) -> StageCosts:
    S = cfg.n_states
    return StageCosts(first=S, blocks=[S * S], last=S * cfg.vocab_size)


def tp_plan(cfg: HMMConfig) -> TensorParallelPlan:
    """Vocabulary-parallel emissions: each rank holds E's columns of its vocabulary slice; the
    per-state normaliser, the emission look-up and the chain's gradient cross ranks through the
    emission's vocab_ops (the chain itself is replicated: S x S is small)."""
    return TensorParallelPlan({"emission": "vocab_columns"}, sequence_parallel=False)


def describe(cfg: HMMConfig) -> str:
    return f"{cfg.n_states} hidden states"


SPEC = FamilySpec(
    name="hmm",
    config_type=HMMConfig,
    model_class=HMMLM,
    blocks="chain",
    first_stage=("emission",),
    last_stage=(),
    capabilities=Capabilities(
        sequence_parallel="the forward algorithm runs along the whole sequence on every rank",
        pipeline="the model is one hidden chain (one block) whose emissions every position needs, nothing to cut into stages",
    ),
    tp_problem=lambda cfg, tp: None,
    tp_plan=tp_plan,
    tied=lambda cfg: None,
    count_params=count_params,
    flops_per_token=flops_per_token,
    stage_costs=stage_costs,
    describe=describe,
    decode_state=FilterDecodeState,
    em=EMHooks(expected_counts=em.expected_counts, m_step=em.m_step, log_prior=em.log_prior),
    # logits of the initial, transition and emission distributions: -inf after EM where a
    # count was zero (no smoothing)
    log_probability_weights=("emission.weight", "chain.0.initial", "chain.0.transition"),
)
