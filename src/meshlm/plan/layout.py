"""What the planner chooses (Layout), what it plans for (Workload), and how software behaves
(Software: the bytes per parameter, attention kernel, overlap of communication).

A Layout maps one-to-one onto meshlm's [parallel] section plus train.micro_batch and
train.activation_checkpointing; `check_meshlm_layout` runs meshlm's own validation
(`parallel_dims_from_config`) on it, so a layout the planner recommends is one meshlm runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from meshlm.config import LOOPED_SCHEDULES, PIPELINE_SCHEDULES, Config, ConfigError, ModelConfig

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    global_batch: int  # sequences per optimizer step
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    recompute: str = "none"  # none | selective (attention core; Megatron) | full (every block; meshlm's checkpointing)
    sequence_parallel: bool = False
    schedule: str = "1f1b"  # pipeline schedule (ignored when pp == 1)
    virtual_stages: int = 1  # stages per pipeline rank (interleaved schedules; 2 for zbv)
    dp_replicate: int = 1  # HSDP replica groups (zero 3)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"zero={self.zero}"]
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate={self.dp_replicate}")
        if self.sequence_parallel:
            parts.append("sp")
        parts.append(f"micro_batch={self.micro_batch}")
        parts.append(f"recompute={self.recompute}")
        if self.pp > 1:
            parts.append(self.schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""))
        return " ".join(parts)

    def schedule_name(self) -> str:
        if self.pp == 1:
            return "-"
        return self.schedule + (f"(v{self.virtual_stages})" if self.schedule in LOOPED_SCHEDULES else "")

    def microbatches(self, global_batch: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline micro-batches,
        or gradient-accumulation steps without a pipeline)."""
        return global_batch // (self.dp * self.micro_batch)

    def parallel_section(self) -> dict[str, object]:
        """The [parallel] keys meshlm reads, plus the train keys the layout decides."""
        pp = self.pp > 1
        return {
            "dp": self.dp,
            "zero": self.zero,
            "dp_replicate": self.dp_replicate,
            "tp": self.tp,
            "sequence_parallel": self.sequence_parallel,
            "pp": self.pp,
            "pp_schedule": self.schedule if pp else "1f1b",
            "pp_microbatches": 0,
            "pp_virtual_stages": self.virtual_stages if pp else 1,
            "micro_batch": self.micro_batch,
            "activation_checkpointing": self.recompute == "full",
        }


@dataclass(frozen=True)
class Software:
    """How the training software stores and moves things. `meshlm` is this repository's
    trainer; `megatron` and `megatron-flash` describe the published large runs."""

    name: str
    param_bytes: float  # working copy of a parameter
    grad_bytes: float
    master_bytes: float  # separate fp32 master copy (0 when the working copy is fp32)
    optimizer_bytes: float  # Adam's two moments
    grad_comm_bytes: float  # gradient element on the wire (DP reduction)
    param_comm_bytes: float  # parameter element on the wire (ZeRO / FSDP all-gather)
    act_bytes: float  # activation element (matmul outputs, TP and PP messages)
    residual_bytes: float  # residual stream element
    attention: str = "flash"  # flash | materialized (scores in memory: pre-FlashAttention Megatron)
    attention_dropout: bool = False
    fused_elementwise: bool = False  # fused norm / bias-gelu / bias-dropout-add / rotary kernels
    separate_qkv: bool = True  # three projection GEMMs (meshlm) or one fused (Megatron)
    weight_traffic_bytes: float = 0.0  # per parameter and micro-batch: autocast weight casts, grad accumulation
    dp_overlap: bool = True  # DP gradient reduction overlaps backward (no pipeline)
    pp_dp_overlap: bool = False  # ... also with a pipeline
    zero_overlap: bool = False  # ZeRO-1/2 reduce-scatter / all-gather overlap compute
    # Tensor-parallel collectives beside GEMMs (plan/tp_overlap.py): "none" (synchronous: meshlm),
    # "backward" (Megatron-LM since 2022: the column-parallel layers' backward collectives run
    # asynchronously beside their dgrad / wgrad GEMMs), "pipelined" (Megatron-Core's
    # --tp-comm-overlap through Transformer Engine: with sequence parallelism every collective is
    # split into tp chunks pipelined with its GEMM; without it, as "backward").
    tp_overlap: str = "none"
    max_zero: int = 3  # the highest ZeRO stage the software has (Megatron: a distributed optimizer, no FSDP)
    optimizer_bytes_per_param: float = 28.0  # memory traffic of one optimizer step (+ clipping)
    optimizer_ops_per_tensor: float = 4.0
    loss_bytes_per_logit: float = 40.0  # cross-entropy traffic per logit (fwd + bwd, casts included)
    bucket_bytes: float = 25 * 2**20
    # Buckets grow with the data-parallel degree so that each rank's share stays large (Megatron-Core:
    # max(40M, 1M x dp) elements): elements per data-parallel rank, 0 = fixed buckets.
    bucket_elements_per_rank: float = 0.0
    activation_model: str = "meshlm"  # meshlm (counted from the code) | megatron (Korthikanti et al. 2022)
    pipeline_split: str = "balanced"  # layers per stage: balanced (meshlm) | even (Megatron) | ends-lighter (Llama 3)

    def dp_bucket_bytes(self, dp: int) -> float:
        """Bytes of gradients per data-parallel bucket (each bucket is one collective)."""
        return max(self.bucket_bytes, self.bucket_elements_per_rank * dp * self.grad_comm_bytes)

    @property
    def state_bytes_per_param(self) -> float:
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.optimizer_bytes

    @property
    def dtype(self) -> str:
        """The compute dtype: activations in 4 bytes are float32, in 2 bytes bfloat16 (mixed precision)."""
        return "float32" if self.act_bytes >= 4 else "bfloat16"


def meshlm_software(device_kind: str, dtype: str = "bfloat16") -> Software:
    """meshlm's trainer: float32 parameters, gradients and AdamW state (16 bytes per parameter);
    on GPUs bf16 autocast (activations bf16, residual stream float32); on CPU float32 throughout."""
    if device_kind == "cpu" or dtype == "float32":
        # fp32: no casts; gradient accumulation over micro-batches reads and writes .grad (12 B/param).
        return Software(
            "meshlm",
            4,
            4,
            0,
            8,
            4,
            4,
            4,
            4,
            weight_traffic_bytes=12.0,
            dp_overlap=device_kind != "cpu",
            optimizer_bytes_per_param=104.0,
            optimizer_ops_per_tensor=14.0,
            loss_bytes_per_logit=32.0,
        )
    # autocast: each micro-batch casts the fp32 weights to bf16 (r4 w2), casts the bf16 weight
    # gradients back (r2 w4) and accumulates them into .grad (r4 r4 w4): 24 B per parameter.
    return Software("meshlm", 4, 4, 0, 8, 4, 4, 2, 4, weight_traffic_bytes=24.0)


SOFTWARE: dict[str, Software] = {
    # Megatron-LM / Megatron-DeepSpeed, 2021-2022 (GPT-3-style runs, MT-NLG, BLOOM): fp16/bf16
    # weights with fp32 main gradients, master weights and Adam state (18 B/param); after each
    # micro-batch a hook adds the 16-bit weight gradient into the fp32 main gradient (w 2, r 2,
    # r 4, w 4 = 12 B per parameter); attention
    # scores materialised (fused scale-mask-softmax kernel, attention dropout); fused QKV
    # GEMM and fused elementwise kernels; gradient all-reduce after the pipeline flush;
    # synchronous tensor-parallel collectives; no ZeRO beyond stage 1 (DeepSpeed's, with pipelines).
    "megatron": Software(
        "megatron",
        2,
        4,
        4,
        8,
        2,
        2,
        2,
        2,
        attention="materialized",
        attention_dropout=True,
        fused_elementwise=True,
        separate_qkv=False,
        weight_traffic_bytes=12.0,
        dp_overlap=False,
        pp_dp_overlap=False,
        zero_overlap=False,
        max_zero=1,
        optimizer_bytes_per_param=30.0,
        optimizer_ops_per_tensor=1.0,
        loss_bytes_per_logit=16.0,
        activation_model="megatron",
        pipeline_split="even",
    ),
    # Megatron-Core style (2023+; Llama 3's 4D parallelism is similar): FlashAttention, no
    # attention dropout, fused weight-gradient accumulation, distributed optimizer (ZeRO-1; no
    # FSDP) with gradient reduce-scatter in fp32 and parameter all-gather in bf16, both overlapped
    # with compute (--overlap-grad-reduce --overlap-param-gather; buckets of max(40M, 1M x dp)
    # elements), sequence parallelism with the TP collectives pipelined with their GEMMs
    # (--tp-comm-overlap, Transformer Engine userbuffers).
    "megatron-flash": Software(
        "megatron-flash",
        2,
        4,
        4,
        8,
        4,
        2,
        2,
        2,
        attention="flash",
        attention_dropout=False,
        fused_elementwise=True,
        separate_qkv=False,
        dp_overlap=True,
        pp_dp_overlap=True,
        zero_overlap=True,
        tp_overlap="pipelined",
        max_zero=2,
        bucket_bytes=40e6 * 4,
        bucket_elements_per_rank=1e6,
        optimizer_bytes_per_param=30.0,
        optimizer_ops_per_tensor=1.0,
        loss_bytes_per_logit=16.0,
        activation_model="megatron",
        pipeline_split="even",
    ),
}


def software_for(name: str | None, device_kind: str, dtype: str = "bfloat16") -> Software:
    if name in (None, "meshlm"):
        return meshlm_software(device_kind, dtype)
    if name not in SOFTWARE:
        raise ConfigError(f"unknown software profile '{name}'; choose meshlm, {', '.join(SOFTWARE)}.")
    return SOFTWARE[name]


# ----------------------------------------------------------------------------- parsing


_LAYOUT_KEYS = {f.name for f in dataclasses.fields(Layout)} | {"v", "sp", "ac"}


def parse_layout(text: str, world_size: int) -> Layout:
    """`dp=4,tp=2,pp=2,zero=1,micro_batch=2,recompute=full,schedule=interleaved-1f1b,virtual_stages=2`
    -> Layout. Omitted degrees: dp fills the world size; others default to 1 / none / 1f1b."""
    values: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ConfigError(
                f"--layout item '{item}' must look like key=value (e.g. tp=2); keys: {', '.join(sorted(_LAYOUT_KEYS))}."
            )
        key, value = (s.strip() for s in item.split("=", 1))
        key = {"v": "virtual_stages", "sp": "sequence_parallel", "ac": "recompute"}.get(key, key)
        if key not in _LAYOUT_KEYS:
            raise ConfigError(
                f"--layout: unknown key '{key}'; keys: {', '.join(sorted(_LAYOUT_KEYS - {'v', 'sp', 'ac'}))}."
            )
        if key == "sequence_parallel":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--layout: sequence_parallel expects true or false, got '{value}'.")
            values[key] = value.lower() in ("true", "1")
        elif key == "recompute":
            value = {"true": "full", "false": "none"}.get(value.lower(), value.lower())
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout: recompute expects one of {', '.join(RECOMPUTE)}, got '{value}'.")
            values[key] = value
        elif key == "schedule":
            if value not in PIPELINE_SCHEDULES:
                raise ConfigError(f"--layout: schedule expects one of {', '.join(PIPELINE_SCHEDULES)}, got '{value}'.")
            values[key] = value
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout: '{key}' expects a positive integer, got '{value}'.") from None
            if values[key] <= 0 and not (key == "zero" and values[key] == 0):
                raise ConfigError(f"--layout: '{key}' expects a positive integer, got {value}.")
    tp, pp = int(values.get("tp", 1)), int(values.get("pp", 1))
    if "dp" not in values:
        if world_size % (tp * pp):
            raise ConfigError(f"--layout: tp x pp = {tp} x {pp} = {tp * pp} does not divide the {world_size} devices.")
        values["dp"] = world_size // (tp * pp)
    if values.get("schedule") == "zbv" and "virtual_stages" not in values:
        values["virtual_stages"] = 2
    if values.get("schedule") in LOOPED_SCHEDULES and "virtual_stages" not in values:
        values["virtual_stages"] = 2
    return Layout(**values)


def layout_config(base: Config, layout: Layout, workload: Workload) -> Config:
    """A copy of `base` with the model, batch, sequence length and this layout filled in."""
    cfg = Config(
        model=replace(workload.model),
        data=replace(base.data, seq_len=workload.seq_len),
        train=replace(base.train),
        parallel=replace(base.parallel),
    )
    section = layout.parallel_section()
    cfg.train.micro_batch = int(section.pop("micro_batch"))
    cfg.train.activation_checkpointing = bool(section.pop("activation_checkpointing"))
    cfg.train.global_batch = workload.global_batch
    for key, value in section.items():
        setattr(cfg.parallel, key, value)
    cfg.parallel.pp_split = "auto"
    return cfg


def check_meshlm_layout(layout: Layout, workload: Workload, world_size: int, base: Config | None = None) -> None:
    """Raise ConfigError unless meshlm can run this layout (meshlm's own validation, plus the
    tensor-parallel MLP split and the recompute policies meshlm implements)."""
    from meshlm.distributed.dims import parallel_dims_from_config

    if layout.recompute == "selective":
        raise ConfigError(
            "recompute=selective (Megatron's attention-only recomputation) is not implemented by meshlm; "
            "meshlm checkpoints whole blocks (recompute=full) or nothing."
        )
    m = workload.model
    if layout.dp_replicate > 1 and layout.zero != 3:
        raise ConfigError(f"dp_replicate={layout.dp_replicate} (HSDP) needs zero=3.")
    if m.max_seq_len < workload.seq_len:
        raise ConfigError(f"the sequence length {workload.seq_len} exceeds model.max_seq_len ({m.max_seq_len}).")
    parallel_dims_from_config(layout_config(base or Config(), layout, workload), world_size)
