"""Presenting a plan: the table, the JSON object and the one-line explanation of the winner."""

from __future__ import annotations

from meshlm.model.registry import family_spec
from meshlm.model.stats import count_params
from meshlm.plan.cost import Estimate
from meshlm.plan.hardware import Cluster
from meshlm.plan.layout import Software, Workload

_CAUSES = (
    ("compute", "compute"),
    ("tp_comm", "tensor-parallel communication"),
    ("pp_bubble", "pipeline bubble"),
    ("pp_p2p", "pipeline sends"),
    ("dp_comm_exposed", "data-parallel communication"),
    ("optimizer", "optimizer step"),
    ("small_collectives", "small collectives"),
)


def header(workload: Workload, cluster: Cluster, sw: Software) -> str:
    m = workload.model
    memory = (
        "params + grads + optimizer state per process" if cluster.device.kind == "cpu" else "per device, all included"
    )
    n = count_params(m)
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return (
        f"meshlm plan: {m.family} {size} parameters ({family_spec(m).describe(m)}) on {cluster.describe()}; "
        f"global batch {workload.global_batch} x {workload.seq_len} tokens; "
        f"software '{sw.name}', {sw.dtype}; memory = {memory}"
    )


def model_json(m) -> dict:
    """The planned model: its family, the [model] keys the block model reads where they exist
    (arch, d_model, n_layers, n_heads, vocab_size, kv_heads, ffn_dim), its blocks and parameters."""
    keys = ("arch", "d_model", "n_layers", "n_heads", "vocab_size", "kv_heads", "ffn_dim")
    spec = family_spec(m)
    return {
        "family": m.family,
        **{k: getattr(m, k) for k in keys if hasattr(m, k)},
        "blocks": spec.n_blocks(m),
        "description": spec.describe(m),
        "parameters": count_params(m),
    }


def runner_up(candidates: list[Estimate]) -> Estimate | None:
    """The fastest fitting candidate whose degrees (dp, tp, pp) or ZeRO stage differ from the winner's
    (the next line of the table often differs only in a detail)."""
    if not candidates or not candidates[0].fits:
        return None
    best = candidates[0].layout
    key = (best.dp, best.tp, best.pp, best.zero)
    for e in candidates[1:]:
        if e.fits and (e.layout.dp, e.layout.tp, e.layout.pp, e.layout.zero) != key:
            return e
    return next((e for e in candidates[1:] if e.fits), None)


def explain(best: Estimate, second: Estimate | None) -> str:
    """One line: why the winner wins."""
    if not best.fits:
        return f"No layout fits in memory. The smallest, {best.layout.describe()}: {best.reason}."
    step = best.step_time_s
    parts = [(best.breakdown.get(k, 0.0) / step, name) for k, name in _CAUSES]
    shares = ", ".join(f"{name} {100 * share:.0f}%" for share, name in sorted(parts, reverse=True) if share >= 0.01)
    text = (
        f"Best: {best.layout.describe()}: {step:.3g} s per step, {best.tflops_per_device:.3g} TFLOP/s per device "
        f"({100 * best.mfu:.0f}% of peak), {best.memory_gb_per_device:.3g} GiB per device; its step is {shares}."
    )
    if second is not None:
        diffs = []
        for k, name in _CAUSES:
            delta = second.breakdown.get(k, 0.0) - best.breakdown.get(k, 0.0)
            if delta > 0.01 * step:
                diffs.append((delta, name))
        why = (" (more " + ", ".join(name for _, name in sorted(diffs, reverse=True)[:2]) + ")") if diffs else ""
        text += f" Runner-up {second.layout.describe()} is {100 * (second.step_time_s / step - 1):.0f}% slower{why}."
    return text


def format_table(candidates: list[Estimate], top: int) -> str:
    cols = (
        "#",
        "dp",
        "tp",
        "pp",
        "zero",
        "mb",
        "recompute",
        "sp",
        "schedule",
        "step s",
        "tokens/s",
        "TFLOP/s/dev",
        "MFU",
        "mem GiB",
        "fits",
    )
    rows = []
    for i, e in enumerate(candidates[:top], 1):
        lay = e.layout
        zero = f"{lay.zero}" + (f"/r{lay.dp_replicate}" if lay.dp_replicate > 1 else "")
        rows.append(
            (
                str(i),
                str(lay.dp),
                str(lay.tp),
                str(lay.pp),
                zero,
                str(lay.micro_batch),
                lay.recompute,
                "y" if lay.sequence_parallel else "-",
                lay.schedule_name(),
                f"{e.step_time_s:.4g}",
                f"{e.tokens_per_s:,.0f}",
                f"{e.tflops_per_device:.3g}",
                f"{100 * e.mfu:.0f}%",
                f"{e.memory_gb_per_device:.3g}",
                "yes" if e.fits else "no",
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    not_fitting = [e for e in candidates[:top] if not e.fits]
    for e in not_fitting[:3]:
        lines.append(f"  does not fit: {e.layout.describe()}: {e.reason}")
    return "\n".join(lines)


def to_json(
    candidates: list[Estimate], workload: Workload, cluster: Cluster, sw: Software, top: int, evaluated: int
) -> dict:
    best = candidates[0] if candidates else None
    second = runner_up(candidates)
    return {
        "model": model_json(workload.model),
        "global_batch": workload.global_batch,
        "seq_len": workload.seq_len,
        "cluster": cluster.to_dict(),
        "software": sw.name,
        "memory_definition": (
            "params + grads + optimizer state per process (what the trainer reports)"
            if cluster.device.kind == "cpu"
            else "total per device, framework reserve included"
        ),
        "evaluated": evaluated,
        "candidates": [e.to_dict() for e in candidates[:top]],
        "explanation": explain(best, second) if best else "",
    }
