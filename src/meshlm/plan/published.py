"""Published large training runs, to check the cost model against (docs/planner.md).

Every figure here was written down from memory of the papers, not copied from them: layouts
and sizes are well known, the throughput figures may be off by a few percent. Each run names
the FLOP count convention its paper used, so that the comparison is made on time per step
(reported FLOP/s per GPU -> seconds per step, with the paper's own formula) and then on the
paper's FLOP/s per GPU.

    megatron   96 B s l h^2 (1 + s / 6h + V / 16 l h)   (activation recomputation counted)
    model      6 N + 12 l s h per token (meshlm.model.stats.flops_per_token; no recomputation)

Where a paper states the iteration time (Korthikanti et al. 2022, Nemotron-4), the comparison
is made on it directly (`reported_step_s`), and the FLOP/s column shows the paper's MFU x peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshlm.model.stats import flops_per_token
from meshlm.plan.hardware import CLUSTERS, DEVICES, GB, Cluster, Link
from meshlm.plan.layout import Layout, Workload


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    model: str  # meshlm.plan.models preset
    cluster: str  # hardware preset (or "jean-zay" below)
    gpus: int
    global_batch: int
    seq_len: int
    layout: Layout
    software: str
    reported_tflops: float  # per GPU, in the paper's convention
    convention: str  # "megatron" or "model"
    note: str = ""
    # Layout fields the paper does not state: the planner fills them in with the fastest choice that fits.
    unknown: tuple[str, ...] = ()

    split: str = ""  # layers per stage, when the paper says (else the software's default)
    reported_step_s: float = 0.0  # the paper's iteration time, when it gives one (compared directly)
    accelerator: str = ""  # "A100" / "H100" (for the summary); from the cluster preset when empty

    def options(self) -> dict[str, tuple]:
        return {"micro_batch": (1, 2, 4, 8, 16), "recompute": ("none", "full"), "virtual_stages": (2, 4, 8)}


def megatron_flops(workload: Workload, global_batch: int | None = None) -> float:
    """Narayanan et al. 2021, eq. 3: FLOPs per iteration with activation recomputation."""
    m = workload.model
    B, s, L, h, V = global_batch or workload.global_batch, workload.seq_len, m.n_layers, m.d_model, m.vocab_size
    return 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def _korthikanti(name: str, model: str, pp: int, gpus: int, batch: int, step_s: float, mfu: float) -> PublishedRun:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    tables 3 and 4: one model-parallel replica (dp 1), sequence 2048,
    tensor parallel 8 with sequence parallelism and selective recomputation, on Selene (DGX A100 80GB)."""
    return PublishedRun(
        name,
        "Korthikanti et al. 2022 (sequence parallelism + selective recomputation), tables 3-4",
        model,
        "dgx-a100-80gb",
        gpus,
        batch,
        2048,
        Layout(1, 8, pp, 0, 1, "selective", True, "1f1b", 1),
        "megatron",
        mfu * 312,
        "megatron",
        f"Megatron-LM 2022, {step_s} s per iteration, MFU {100 * mfu:.1f}%; micro-batch 1 with a pipeline",
        unknown=() if pp > 1 else ("micro_batch",),
        reported_step_s=step_s,
    )


def _nemotron(size: str, dp: int, pp: int, batch: int, step_s: float, mfu: float) -> PublishedRun:
    big = size == "340B"
    return PublishedRun(
        f"Nemotron-4 {size}, {dp * 8 * pp} GPUs",
        f"NVIDIA 2024, Nemotron-4 {size} technical report, batch ramp-up table",
        f"nemotron4-{size.lower()}",
        "dgx-h100",
        dp * 8 * pp,
        batch,
        4096,
        Layout(dp, 8, pp, 1, 1, "none", True, "interleaved-1f1b" if big else "1f1b", 4 if big else 1),
        "megatron-flash",
        mfu * 989,
        "model",
        f"Megatron-Core (NeMo), bf16, tp 8{' x pp 12, interleaved' if big else ''}, distributed optimizer; "
        f"{step_s} s per iteration, MFU {100 * mfu:.1f}%; "
        + ("virtual stages not stated" if big else "micro-batch not stated: 1 assumed (4 per step at every dp)"),
        unknown=("virtual_stages",) if big else (),
        reported_step_s=step_s,
    )


def step_flops(run: PublishedRun, workload: Workload) -> float:
    if run.convention == "megatron":
        return megatron_flops(workload)
    return flops_per_token(workload.model, workload.seq_len) * workload.tokens_per_step


def _megatron(name: str, model: str, tp: int, pp: int, gpus: int, batch: int, tflops: float) -> PublishedRun:
    dp = gpus // (tp * pp)
    return PublishedRun(
        name,
        "Narayanan et al. 2021 (Megatron-LM, SC'21), table 1",
        model,
        "dgx-a100-80gb",
        gpus,
        batch,
        2048,
        Layout(dp, tp, pp, 0, 1, "full", False, "1f1b", 1),
        "megatron",
        tflops,
        "megatron",
        "fp16, full recomputation; 1F1B assumed (the table does not say interleaved); micro-batch 1 "
        "with a pipeline, not stated without one",
        unknown=() if pp > 1 else ("micro_batch",),
    )


# BLOOM trained on Jean Zay: 8 A100 80GB per node (NVLink), 4 x 100 Gb/s Omni-Path per node
# (12.5 GB/s x 4 / 8 GPUs = 6.25 GB/s per GPU).
JEAN_ZAY = Cluster("jean-zay", DEVICES["a100-80gb"], 48, 8, CLUSTERS["dgx-a100-80gb"][1], Link(6.25 * GB, 6e-6, 0.8))

RUNS: tuple[PublishedRun, ...] = (
    _megatron("Megatron-LM 1.7B", "megatron-1.7b", 1, 1, 32, 512, 137),
    _megatron("Megatron-LM 3.6B", "megatron-3.6b", 2, 1, 64, 512, 138),
    _megatron("Megatron-LM 7.5B", "megatron-7.5b", 4, 1, 128, 512, 142),
    _megatron("Megatron-LM 18.4B", "megatron-18b", 8, 1, 256, 1024, 135),
    _megatron("Megatron-LM 39.1B", "megatron-39b", 8, 2, 512, 1536, 138),
    _megatron("Megatron-LM 76.1B", "megatron-76b", 8, 4, 1024, 1792, 140),
    _megatron("Megatron-LM 145.6B", "megatron-146b", 8, 8, 1536, 2304, 148),
    _megatron("Megatron-LM 310.1B", "megatron-310b", 8, 16, 1920, 2160, 155),
    _megatron("Megatron-LM 529.6B", "megatron-530b", 8, 35, 2520, 2520, 163),
    _megatron("Megatron-LM 1T", "megatron-1t", 8, 64, 3072, 3072, 163),
    # Smith et al. 2022: iteration times 60.1 / 50.2 / 44.4 s at 280 / 350 / 420 DGX A100 nodes.
    *(
        PublishedRun(
            f"MT-NLG 530B, {n} nodes",
            "Smith et al. 2022 (Megatron-Turing NLG 530B)",
            "mt-nlg-530b",
            "dgx-a100-80gb",
            8 * n,
            1920,
            2048,
            Layout(n // 35, 8, 35, 1, 1, "full", False, "1f1b", 1),
            "megatron",
            tf,
            "megatron",
            "Megatron-DeepSpeed, bf16, ZeRO-1, full recomputation",
        )
        for n, tf in ((280, 126), (350, 121), (420, 113))
    ),
    PublishedRun(
        "BLOOM 176B",
        "BigScience 2022 (BLOOM paper, section 3.4; model card)",
        "bloom-176b",
        "jean-zay",
        384,
        2048,
        2048,
        Layout(8, 4, 12, 1, 2, "full", False, "1f1b", 1),
        "megatron",
        150,
        "megatron",
        "Megatron-DeepSpeed, bf16, ZeRO-1, ~150 TFLOP/s quoted (approximate); ALiBi modelled as learned positions",
    ),
    _korthikanti("Korthikanti 22B", "megatron-22b", 1, 8, 4, 1.10, 0.415),
    _korthikanti("Korthikanti 175B", "megatron-175b", 8, 64, 64, 13.75, 0.514),
    _korthikanti("Korthikanti 530B", "megatron-530b", 35, 280, 280, 37.83, 0.560),
    _korthikanti("Korthikanti 1T", "megatron-1t", 64, 512, 512, 71.49, 0.563),
    *(
        _nemotron("15B", dp, 1, batch, t, mfu)
        for dp, batch, t, mfu in ((96, 384, 0.57, 0.343), (192, 768, 0.58, 0.333), (288, 1152, 0.64, 0.305))
    ),
    *(
        _nemotron("340B", dp, 12, batch, t, mfu)
        for dp, batch, t, mfu in ((16, 768, 10.3, 0.424), (32, 1536, 10.3, 0.423), (64, 2304, 8.0, 0.410))
    ),
    PublishedRun(
        "Llama 3 405B, 8K GPUs",
        "Llama Team 2024 (The Llama 3 Herd of Models), table 4",
        "llama3-405b",
        "dgx-h100",
        8192,
        2048,
        8192,
        Layout(64, 8, 16, 2, 1, "none", True, "interleaved-1f1b", 4),
        "megatron-flash",
        430,
        "model",
        "BF16 MFU 43%; FSDP-style sharding of gradients and optimizer (zero 2); virtual stages not stated; "
        "the paper trains without activation checkpointing, which our memory model puts over 80 GB, "
        "so recomputation is left to the planner; one layer fewer on the first and last stages",
        unknown=("recompute", "virtual_stages"),
        split="ends-lighter",
    ),
    PublishedRun(
        "Llama 3 405B, 16K GPUs",
        "Llama Team 2024 (The Llama 3 Herd of Models), table 4",
        "llama3-405b",
        "dgx-h100",
        16384,
        2048,
        8192,
        Layout(128, 8, 16, 2, 1, "none", True, "interleaved-1f1b", 4),
        "megatron-flash",
        400,
        "model",
        "BF16 MFU 41%; as above",
        unknown=("recompute", "virtual_stages"),
        split="ends-lighter",
    ),
)


def run_cluster(run: PublishedRun) -> Cluster:
    from meshlm.plan.clusters import make_cluster

    if run.cluster == "jean-zay":
        return replace(JEAN_ZAY, nodes=run.gpus // 8)
    return make_cluster(run.cluster, nodes=run.gpus // 8, devices_per_node=8)


@dataclass
class Comparison:
    run: PublishedRun
    layout: Layout  # theirs, micro-batch filled in
    predicted_step_s: float
    reported_step_s: float
    predicted_tflops: float  # in the paper's convention
    best_layout: Layout | None
    best_step_s: float | None
    fits: bool

    @property
    def error(self) -> float:
        """(predicted - reported) / reported throughput per GPU."""
        return self.predicted_tflops / self.run.reported_tflops - 1


def compare(run: PublishedRun, with_search: bool = True) -> Comparison:
    from meshlm.plan.cost import estimate
    from meshlm.plan.layout import software_for
    from meshlm.plan.models import model_preset
    from meshlm.plan.search import search

    cluster = run_cluster(run)
    sw = software_for(run.software, "gpu")
    if run.split:
        sw = replace(sw, pipeline_split=run.split)
    workload = Workload(model_preset(run.model), run.global_batch, run.seq_len)
    layout = run.layout
    if layout.dp * layout.tp * layout.pp != run.gpus:
        layout = replace(layout, dp=run.gpus // (layout.tp * layout.pp))
    variants = [layout]
    for key in run.unknown:  # fill in what the paper does not state: every option, the fastest that fits wins
        variants = [replace(v, **{key: value}) for v in variants for value in run.options()[key]]
    local = run.global_batch // layout.dp
    variants = [
        v
        for v in variants
        if local % v.micro_batch == 0 and (v.pp == 1 or v.pp * v.virtual_stages <= workload.model.n_layers)
    ]
    est = min((estimate(workload, v, cluster, sw) for v in variants), key=lambda e: (not e.fits, e.step_time_s))
    flops = step_flops(run, workload)
    reported_step = run.reported_step_s or flops / (run.reported_tflops * 1e12 * run.gpus)
    best_layout = best_step = None
    if with_search:
        result = search(workload, cluster, sw, top=1, meshlm_only=False, micro_batches=(1, 2, 4, 8, 16))
        if result.best:
            best_layout, best_step = result.best.layout, result.best.step_time_s
    return Comparison(
        run,
        est.layout,
        est.step_time_s,
        reported_step,
        run.reported_tflops * reported_step / est.step_time_s,
        best_layout,
        best_step,
        est.fits,
    )
