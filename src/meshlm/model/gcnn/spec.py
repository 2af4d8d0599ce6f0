"""The gated CNN family's spec: what parallelism, checkpoints, inference and the planner need
to know about `model.py`, as data."""

from __future__ import annotations

from meshlm.model.gcnn import stats
from meshlm.model.gcnn.config import GCNNConfig
from meshlm.model.gcnn.decode import ConvDecodeState
from meshlm.model.gcnn.model import GatedCNN
from meshlm.model.spec import Capabilities, FamilySpec, TensorParallelPlan


def tp_problem(cfg: GCNNConfig, tp: int) -> str | None:
    """Why the model cannot be split over `tp` ranks (None when it can): tensor parallelism
    splits the convolutions' output channels."""
    C = cfg.conv_channels
    if tp <= 1 or C % tp == 0:
        return None
    divisors = ", ".join(str(t) for t in range(1, C + 1) if C % t == 0)
    default = (
        ""
        if cfg.channels
        else f", the default: the convolution's input width (model.{'bottleneck' if cfg.bottleneck else 'd_model'})"
    )
    return (
        f"tensor parallelism splits the gated convolutions' channels over tp={tp} ranks, but "
        f"model.channels ({C}{default}) is not divisible by {tp}. Use tp among {divisors}, or set "
        f"model.channels to a multiple of {tp} (e.g. {tp * -(-C // tp)})."
    )


def tp_plan(cfg: GCNNConfig) -> TensorParallelPlan:
    """Megatron's split, over channels: both halves of each gated linear unit column-parallel
    (rank r holds channels [r C/tp, (r+1) C/tp) of conv_a and of conv_b, so its gate multiplies
    its own linear half), the projection back to d_model row-parallel; the vocabulary split in
    the embedding and the output layer. The convolution sits inside the region (entered at
    `glu`), so under sequence parallelism f all-gathers the whole sequence before it and every
    rank convolves over all positions; the norms and the bottleneck projection (replicated) run
    on the rank's sequence chunk."""
    styles = {
        "layers.*.glu.conv_a": "column",
        "layers.*.glu.conv_b": "column",
        "layers.*.glu.proj": "row",
        "tok_embeddings": "vocab_embedding",
        "output": "vocab_output",
    }
    return TensorParallelPlan(styles, regions=("layers.*.glu", "output"))


def tied(cfg: GCNNConfig) -> tuple[str, str] | None:
    return ("tok_embeddings.weight", "output.weight") if cfg.tied else None


def describe(cfg: GCNNConfig) -> str:
    shape = f"bottleneck {cfg.bottleneck}, " if cfg.bottleneck else ""
    return (
        f"gated CNN, {cfg.n_layers} blocks, d_model {cfg.d_model}, {shape}{cfg.conv_channels} channels, "
        f"kernel {cfg.kernel_size} (sees {cfg.receptive_field} tokens)"
    )


SPEC = FamilySpec(
    name="gcnn",
    config_type=GCNNConfig,
    model_class=GatedCNN,
    blocks="layers",
    first_stage=("tok_embeddings",),
    last_stage=("norm", "output"),
    capabilities=Capabilities(),
    tp_problem=tp_problem,
    tp_plan=tp_plan,
    tied=tied,
    count_params=stats.count_params,
    flops_per_token=stats.flops_per_token,
    stage_costs=stats.stage_costs,
    describe=describe,
    decode_state=ConvDecodeState,
)
