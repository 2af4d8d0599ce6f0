"""FamilySpec: everything the rest of meshlm needs to know about a model family.

A family is a folder under `model/` with a plain single-device `nn.Module` (no process
group, rank or mesh in sight), its [model] config section and one `FamilySpec`, registered by
name in `model/registry.py`. Parallelism, training, checkpoints, export, inference and the
planner read the spec; none of them imports a family or names its module attributes.

The model module's contract (what the spec's names point at):

    model.<blocks>             nn.ModuleDict {"0": block, "1": ...} of the repeated blocks: the
                               unit of activation checkpointing, per-block compile, FSDP
                               sharding and pipeline cuts (a dict, so a stage keeps the names)
    model.<first_stage...>     modules only the first pipeline stage runs (embeddings), and
    model.<last_stage...>      those only the last one runs (final norm, output layer): a
                               pipeline stage is a copy of the model with the others set to None
    model(x)                   x: token ids (B, T) when the first-stage modules are present,
                               else hidden states (B, T, d); returns logits (B, T, V) when the
                               last-stage modules are present, else hidden states
    model.init_weights(gen)    initialise every parameter (also after `to_empty()`), deterministic
                               given the generator
    model.tie_weights()        re-tie shared weights (after `to_empty()` or loading; no-op if none)
    model.reset_buffers()      recompute derived, non-persistent buffers (rotary tables, ...)

The names may be dotted paths into submodules ("backbone.layers"): a derived model (a task
model over a backbone, meshlm.tasks) names its backbone's modules that way; `submodule` reads
them. A family that can serve as a task backbone keeps two conventions: `first_stage[0]` is the
token embedding ((B, T) ids -> (B, T, d)), and `last_stage[-1]` is the output layer mapping the
hidden states (B, T, d) to vocabulary logits (an nn.Linear); the forward returns the hidden
states when the output layer is None.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from meshlm.config import ModelConfig


def submodule(model: Any, path: str) -> Any:
    """The module at a spec name ("layers", "backbone.norm"), or None where any step is None
    or missing (a pipeline stage without it, an optional module)."""
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


ShardStyle = Literal["column", "row", "vocab_embedding", "vocab_output", "sequence_sliced_embedding", "vocab_columns"]


@dataclass(frozen=True)
class TensorParallelPlan:
    """How tensor parallelism splits a family's modules, as data (Megatron-LM's scheme).

    Each entry maps a module path pattern (dots; `*` matches one name, e.g.
    "layers.*.attention.wq") to a style:

      column                   nn.Linear / nn.Conv1d split along output features (dim 0 of the
                               weight and bias); `halves` > 1 splits each of that many equal
                               output blocks consistently (a gated linear unit's [a; b])
      row                      nn.Linear split along input features (dim 1); the partial
                               products are summed over the group, the bias added once after
      vocab_embedding          nn.Embedding split by vocabulary rows (padded to a multiple of tp)
      vocab_output             the output layer, column-parallel over the padded vocabulary:
                               local logits, never gathered in training
      sequence_sliced_embedding  a replicated position embedding that, under sequence
                               parallelism, looks up only this rank's part of the sequence
      vocab_columns            a module whose parameters all have the vocabulary as their last
                               dimension (per-token score tables: a log-linear model's feature
                               weights and bias, an HMM's emission logits): each is split along
                               it (padded to a multiple of tp), the module's forward is unchanged
                               and so yields this rank's vocabulary slice; reductions over the
                               vocabulary go through its `vocab_ops` attribute (VocabOps below),
                               which tensor parallelism replaces by the group's collectives

    `regions` are the module paths whose input passes through Megatron's f (identity forward,
    all-reduce backward; all-gather along the sequence under sequence parallelism): the
    entrance of each span that starts with column-parallel layers and ends with a row-parallel
    one (or the output layer).
    """

    styles: dict[str, ShardStyle]
    regions: tuple[str, ...] = ()
    halves: dict[str, int] = field(default_factory=dict)
    sequence_parallel: bool = True  # whether the family's blocks run sequence-sharded between regions


@dataclass(frozen=True)
class Capabilities:
    """Which layouts a family can run: None where it can, else the reason it cannot. A layout it
    cannot run is refused before launch, naming the family, the reason and what it can run; the
    planner never proposes it. Every data-parallel mode (ZeRO 0-3, FSDP, HSDP) works on any module."""

    tensor_parallel: str | None = None
    sequence_parallel: str | None = None
    pipeline: str | None = None
    # What tensor parallelism splits when it splits only part of the model (e.g. "the vocabulary
    # only"), named wherever the family's layouts are listed: a user learns it from any refusal.
    tensor_parallel_scope: str = ""

    def supported(self) -> str:
        runs = ["data parallel (ZeRO 0-3, HSDP)"]
        if not self.tensor_parallel:
            notes = [self.tensor_parallel_scope] if self.tensor_parallel_scope else []
            notes += ["without sequence parallel"] if self.sequence_parallel else []
            runs.append("tensor parallel" + (f" ({'; '.join(notes)})" if notes else ""))
        if not self.pipeline:
            runs.append("pipeline parallel")
        return ", ".join(runs)

    def refusal(self, family: str, tp: int, sequence_parallel: bool, pp: int) -> str | None:
        for wanted, what, reason in (
            (tp > 1, f"tensor parallelism (tp={tp})", self.tensor_parallel),
            (sequence_parallel, "sequence parallelism", self.sequence_parallel),
            (pp > 1, f"pipeline parallelism (pp={pp})", self.pipeline),
        ):
            if wanted and reason:
                return (
                    f"model.family '{family}' cannot run {what}: {reason}. It can run {self.supported()}; "
                    f"change the [parallel] degrees or the model family."
                )
        return None


@dataclass(frozen=True)
class StageCosts:
    """Relative compute per token (e.g. matmul parameters) of the first-stage modules, each
    block, and the last-stage modules: what the pipeline splitter balances."""

    first: float
    blocks: list[float]
    last: float


class VocabOps(Protocol):
    """Reductions over the vocabulary (the last dimension) of a `vocab_columns` module's tensors.
    On one device these are plain torch ops (meshlm.model.vocab_ops.LOCAL_VOCAB_OPS); under
    tensor parallelism each rank holds a slice of the vocabulary and the same calls become
    collectives (meshlm.parallel.vocab_parallel.TensorParallelVocabOps), so model code stays
    free of process groups. Every op is differentiable."""

    def logsumexp(self, x: Any) -> Any:
        """log sum_v exp(x[..., v]) over the whole (unpadded) vocabulary: (..., V_local) -> (...)."""

    def select(self, table: Any, tokens: Any) -> Any:
        """table[:, tokens] moved last: table (R, V_local), tokens (...) global ids -> (..., R)."""

    def enter(self, x: Any) -> Any:
        """Megatron's f: the identity, whose backward sums the gradient over the ranks. For a
        replicated tensor that feeds a computation on this rank's vocabulary slice."""


@dataclass(frozen=True)
class EMHooks:
    """Closed-form training by expectation-maximisation (Baum-Welch for an HMM), driven by the
    trainer's EM runner (meshlm.train.full_batch): the E-step's sufficient statistics are sums
    over sequences, so data-parallel ranks each sum their shard and one all-reduce gives the
    single-process totals; the M-step then runs identically on every rank.

        counts = expected_counts(model, x)      x (B, T) token ids -> {name: float64 tensor};
                                                must include "log_likelihood" (sum over x)
        m_step(model, counts, smoothing)        set the parameters from the summed counts
                                                (add-`smoothing` to every count)
        log_prior(model, smoothing)             log of the prior that add-k smoothing is the MAP
                                                estimate under (0 without smoothing): EM's
                                                objective is log-likelihood + log prior
    """

    expected_counts: Callable[[Any, Any], dict[str, Any]]
    m_step: Callable[[Any, dict[str, Any], float], None]
    log_prior: Callable[[Any, float], float]


class DecodeState(Protocol):
    """Incremental decoding state of up to `max_batch` sequences ("slots") of up to `max_len`
    tokens, driven by the inference engine's scheduler. The family builds it from its own
    modules (`FamilySpec.decode_state(model, max_batch, max_len)`): the KV cache for a
    transformer, (h, c) per slot for an LSTM, the last k-1 inputs of each convolution for a
    gated CNN, the last n-1 tokens for a maximum-entropy model, the filtered state distribution
    for an HMM. The same code runs on a tensor-parallel shard: logits are then this rank's
    vocabulary slice (the engine gathers them).

    The engine keeps active sequences in slots 0..n-1; a finished sequence's slot is refilled
    by moving the last active one into it (`move_slot`). A slot of length 0 holds no sequence:
    whatever state it still has is never read (prefill into it starts afresh).

    Optionally, for CUDA graphs (inference/cuda_graphs.py), a fixed-shape decode step:

        decode_static(tokens, positions) -> (nb, V_local) logits
            tokens, positions: (nb,) device tensors for the slots 0..nb-1. Shapes depend on nb
            only, nothing synchronises with the host, and the state's tensors are never
            reallocated; `lengths` is left to the caller. Rows past the active slots are
            padding on free slots (length 0): their state may be overwritten."""

    max_batch: int
    max_len: int
    lengths: list[int]  # tokens consumed per slot (host side: known without a device sync)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> Any:
        """Append each prompt to its slot (from the slot's current length); return the logits
        after each prompt's last token, (n, V_local)."""

    def decode(self, tokens: Any) -> Any:
        """Feed one token (tokens: (n,) long) to each of the slots 0..n-1; return (n, V_local) logits."""

    def release(self, slot: int) -> None:
        """Forget a slot's sequence (its length becomes 0)."""

    def move_slot(self, src: int, dst: int) -> None:
        """Move sequence `src` into slot `dst` (compaction after `dst` finished); `src` is
        then free (length 0)."""

    def nbytes(self) -> int:
        """Memory held by the state (for metrics and planning)."""


@dataclass(frozen=True)
class HFAdapter:
    """A family's Hugging Face interoperability: config.json <-> its [model] section, and
    Hugging Face tensor names/layouts <-> its state dict. Only what the family computes exactly
    is accepted; everything else is refused by name (ConfigError)."""

    architectures: tuple[str, ...]  # the `architectures` entries it imports, e.g. "LlamaForCausalLM"
    model_types: dict[str, str]  # config.json `model_type` -> architecture, for configs without `architectures`
    config_from_hf: Callable[[dict, str], ModelConfig]  # (config.json dict, source) -> [model] section
    config_to_hf: Callable[..., dict]  # (cfg, bos_token_id=, eos_token_id=) -> config.json dict
    state_from_hf: Callable[..., dict]  # (HF tensors, cfg, source) -> meshlm state dict
    state_to_hf: Callable[..., dict]  # (meshlm state dict, cfg) -> HF tensors

    def architecture_of(self, hf: dict) -> str | None:
        """The architecture of a config.json this adapter imports (None: not this family's)."""
        archs = hf.get("architectures") or []
        archs = [archs] if isinstance(archs, str) else archs
        if not archs:
            return self.model_types.get(hf.get("model_type"))
        return next((a for a in archs if a in self.architectures), None)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_type: type[ModelConfig]
    model_class: type  # model_class(cfg) builds the full single-device model (on the default device)
    blocks: str  # attribute holding the nn.ModuleDict of repeated blocks
    first_stage: tuple[str, ...]  # attributes only the first pipeline stage keeps
    last_stage: tuple[str, ...]  # attributes only the last pipeline stage keeps
    capabilities: Capabilities
    # (cfg, tp) -> why tp cannot split this model (None when it can): heads, widths, ...
    tp_problem: Callable[[Any, int], str | None]
    # cfg -> the tensor-parallel plan (None when the family declares tensor parallelism unsupported)
    tp_plan: Callable[[Any], TensorParallelPlan | None]
    # cfg -> ("stored.weight", "copy.weight") of a tied pair (the copy is not stored), or None
    tied: Callable[[Any], tuple[str, str] | None]
    count_params: Callable[[Any], int]
    # (cfg, seq_len, training) -> FLOPs per token (model FLOPs: 2 per matmul weight forward, x3 training)
    flops_per_token: Callable[[Any, int, bool], float]
    stage_costs: Callable[[Any], StageCosts]
    describe: Callable[[Any], str]  # a short description for logs: "llama, 4 layers, d_model 128"
    # (model, max_batch, max_len) -> DecodeState: what the inference engine drives
    decode_state: Callable[..., DecodeState] | None = None
    # model -> the module tree to decode with, where the engine copies weights for speed anyway
    # (CPU float32, see inference/linear_ops): a `shared_copy` of the model with decode-only
    # rewrites such as fused projections. None: decode the model's own modules.
    decode_model: Callable[[Any], Any] | None = None
    hf: HFAdapter | None = None  # optional Hugging Face import/export (meshlm.interop drives it)
    # (cfg, batch) -> {name: seconds}: micro-benchmarks the planner calibrates its CPU model with
    calibrate: Callable[..., dict] | None = None
    em: EMHooks | None = None  # training by EM (`train.optimizer = "em"`), for families that have it
    # Weights that are (unnormalised) log-probabilities, where -inf is a valid value: probability
    # zero, as EM sets it for an event never counted. Loading refuses NaN and +inf everywhere,
    # -inf everywhere else (meshlm.artifacts.weights_file.check_finite).
    log_probability_weights: tuple[str, ...] = ()

    def n_blocks(self, cfg) -> int:
        return len(self.stage_costs(cfg).blocks)


def shared_copy(module):
    """A copy of an nn.Module tree that shares every parameter, buffer and hook with `module`:
    submodules can be swapped or added in the copy without touching the original."""
    new = copy.copy(module)  # a new __dict__; the parameter and buffer dicts stay shared
    new._modules = {name: None if m is None else shared_copy(m) for name, m in module._modules.items()}
    return new
