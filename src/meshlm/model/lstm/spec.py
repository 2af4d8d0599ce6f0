"""The LSTM family's spec: what parallelism, checkpoints, inference and the planner need to
know about `model.py`, as data.

Tensor parallelism splits the vocabulary only (the embedding rows and the output layer's
columns, Megatron's vocabulary-parallel scheme); the LSTM layers stay whole and identical on
every tp rank. Splitting the recurrence itself would need the full h_t on every rank before
step t+1 (an all-gather per layer per time step, T of them in sequence per micro-batch), and
the sequence cannot be split either: step t needs step t-1. Both are declared, not attempted.
"""

from __future__ import annotations

from meshlm.model.lstm import stats
from meshlm.model.lstm.config import LSTMConfig
from meshlm.model.lstm.decode import decode_state
from meshlm.model.lstm.model import LSTMLanguageModel
from meshlm.model.spec import Capabilities, FamilySpec, TensorParallelPlan

CAPABILITIES = Capabilities(
    sequence_parallel=(
        "its recurrence runs along the sequence (step t needs step t-1), so the sequence cannot be split "
        "over the tensor-parallel ranks; tensor parallelism splits only the vocabulary (embedding and output "
        "layer) and keeps the LSTM layers whole on every rank. Set parallel.sequence_parallel=false"
    ),
    tensor_parallel_scope="the vocabulary only: embedding and output layer split, LSTM layers replicated",
)


def tp_problem(cfg: LSTMConfig, tp: int) -> str | None:
    """Any tp splits the model: the vocabulary is padded to a multiple of tp."""
    return None


def tp_plan(cfg: LSTMConfig) -> TensorParallelPlan:
    """The vocabulary split of the embedding and the output layer; everything between them is
    replicated. The output layer's input passes Megatron's f (identity forward, all-reduce
    backward): each rank's logits see only its vocabulary slice, so the gradient reaching the
    replicated LSTM is the sum over ranks, and the LSTM's gradients are then equal on all ranks."""
    return TensorParallelPlan(
        {"embedding": "vocab_embedding", "output": "vocab_output"}, regions=("output",), sequence_parallel=False
    )


def tied(cfg: LSTMConfig) -> tuple[str, str] | None:
    return ("embedding.weight", "output.weight") if cfg.tied else None


def describe(cfg: LSTMConfig) -> str:
    proj = ", projection" if cfg.has_projection else ""
    return (
        f"lstm, {cfg.n_layers} layers, d_embed {cfg.d_embed}, d_hidden {cfg.d_hidden}"
        f"{', tied' if cfg.tied else ''}{proj}"
    )


SPEC = FamilySpec(
    name="lstm",
    config_type=LSTMConfig,
    model_class=LSTMLanguageModel,
    blocks="layers",
    first_stage=("embedding",),
    last_stage=("proj", "output"),
    capabilities=CAPABILITIES,
    tp_problem=tp_problem,
    tp_plan=tp_plan,
    tied=tied,
    count_params=stats.count_params,
    flops_per_token=stats.flops_per_token,
    stage_costs=stats.stage_costs,
    describe=describe,
    decode_state=decode_state,
)
