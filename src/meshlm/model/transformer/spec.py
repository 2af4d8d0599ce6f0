"""The transformer family's spec: what parallelism, checkpoints, inference and the planner need
to know about `model.py`, as data."""

from __future__ import annotations

import math

from meshlm.model.spec import Capabilities, FamilySpec, HFAdapter, TensorParallelPlan
from meshlm.model.transformer import decode, hf_config, hf_weights, stats
from meshlm.model.transformer.calibration import measure_reference_block
from meshlm.model.transformer.config import TransformerConfig
from meshlm.model.transformer.model import Transformer


def tp_divisors(cfg: TransformerConfig) -> list[int]:
    """Every tensor-parallel degree the model can be split over: the common divisors of the
    attention heads, the key/value heads and the MLP hidden size."""
    g = math.gcd(cfg.n_heads, cfg.kv_heads, cfg.ffn_dim)
    return [d for d in range(1, g + 1) if g % d == 0]


def tp_problem(cfg: TransformerConfig, tp: int) -> str | None:
    """Why the model cannot be split over `tp` ranks (None when it can)."""
    if tp <= 1:
        return None
    bad = []
    if cfg.n_heads % tp:
        bad.append(f"model.n_heads ({cfg.n_heads})")
    if cfg.kv_heads % tp:
        bad.append(f"model.n_kv_heads ({cfg.kv_heads})")
    if cfg.ffn_dim % tp:
        default = "" if cfg.ffn_hidden else ", the default for this d_model"
        bad.append(f"the MLP hidden size model.ffn_hidden ({cfg.ffn_dim}{default})")
    if not bad:
        return None
    verb = "is" if len(bad) == 1 else "are"
    fix = f"Use tp among {', '.join(map(str, tp_divisors(cfg)))}"
    if cfg.ffn_dim % tp:
        fix += f", or set model.ffn_hidden to a multiple of {tp} (e.g. {tp * -(-cfg.ffn_dim // tp)})"
    return (
        f"tensor parallelism splits the attention heads and the MLP over tp={tp} ranks, but "
        f"{', '.join(bad)} {verb} not divisible by {tp}. {fix}."
    )


def tp_plan(cfg: TransformerConfig) -> TensorParallelPlan:
    """Megatron-LM's split: q, k, v and the MLP's input projections column-parallel (each rank
    its heads, GQA groups kept together), the attention output and the MLP's output projection
    row-parallel; the vocabulary split in the embedding and the output layer."""
    styles = {
        "layers.*.attention.wq": "column",
        "layers.*.attention.wk": "column",
        "layers.*.attention.wv": "column",
        "layers.*.attention.wo": "row",
        "layers.*.feed_forward.w1": "column",
        "layers.*.feed_forward.w3": "column",
        "layers.*.feed_forward.w2": "row",
        "tok_embeddings": "vocab_embedding",
        "output": "vocab_output",
        "pos_embeddings": "sequence_sliced_embedding",
    }
    return TensorParallelPlan(styles, regions=("layers.*.attention", "layers.*.feed_forward", "output"))


def tied(cfg: TransformerConfig) -> tuple[str, str] | None:
    return ("tok_embeddings.weight", "output.weight") if cfg.tied else None


def describe(cfg: TransformerConfig) -> str:
    return f"{cfg.arch}, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads"


SPEC = FamilySpec(
    name="transformer",
    config_type=TransformerConfig,
    model_class=Transformer,
    blocks="layers",
    first_stage=("tok_embeddings", "pos_embeddings"),
    last_stage=("norm", "output"),
    capabilities=Capabilities(),
    tp_problem=tp_problem,
    tp_plan=tp_plan,
    tied=tied,
    count_params=stats.count_params,
    flops_per_token=stats.flops_per_token,
    stage_costs=stats.stage_costs,
    describe=describe,
    calibrate=measure_reference_block,
    hf=HFAdapter(
        architectures=hf_config.SUPPORTED_ARCHITECTURES,
        model_types={v: k for k, v in hf_config.MODEL_TYPES.items()},
        config_from_hf=hf_config.model_config_from_hf,
        config_to_hf=hf_config.hf_config_from_model,
        state_from_hf=hf_weights.state_dict_from_hf,
        state_to_hf=hf_weights.state_dict_to_hf,
    ),
    decode_state=decode.decode_state,
    decode_model=decode.decode_model,
)
