"""`meshlm plan --png FILE`: every candidate layout as a point, predicted step time against memory
per device, because a chart of thousands of layouts reads faster than a 30-row table.

Layouts that do not fit are grey crosses; the ones that fit are coloured by their model-parallel
degrees (tp x pp); the Pareto front (no other fitting layout is both faster and smaller) is a
line through ringed points, the fastest of them labelled with its layout.
"""

from __future__ import annotations

from pathlib import Path

from meshlm.plan.cost import Estimate
from meshlm.plan.hardware import Cluster, GiB


def pareto_front(estimates: list[Estimate]) -> list[Estimate]:
    """The fitting layouts no other fitting layout beats on both step time and memory, by memory."""
    front: list[Estimate] = []
    for e in sorted((e for e in estimates if e.fits), key=lambda e: (e.memory_gb_per_device, e.step_time_s)):
        if not front or e.step_time_s < front[-1].step_time_s:
            front.append(e)
    return front


def plot_candidates(estimates: list[Estimate], cluster: Cluster, path: Path, title: str) -> list[Estimate]:
    """Write the chart to `path` (PNG); returns the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    misfits = [e for e in estimates if not e.fits]
    if misfits:
        ax.scatter(
            [e.memory_gb_per_device for e in misfits],
            [e.step_time_s for e in misfits],
            marker="x",
            s=12,
            color="0.75",
            label=f"does not fit ({len(misfits)})",
        )
    fitting = [e for e in estimates if e.fits]
    groups: dict[tuple[int, int], list[Estimate]] = {}
    for e in fitting:
        groups.setdefault((e.layout.tp, e.layout.pp), []).append(e)
    cmap = plt.get_cmap("viridis", max(2, len(groups)))
    for i, ((tp, pp), group) in enumerate(sorted(groups.items())):
        ax.scatter(
            [e.memory_gb_per_device for e in group],
            [e.step_time_s for e in group],
            s=14,
            color=cmap(i),
            alpha=0.8,
            label=f"tp={tp} pp={pp} ({len(group)})",
        )
    front = pareto_front(estimates)
    if front:
        ax.plot(
            [e.memory_gb_per_device for e in front],
            [e.step_time_s for e in front],
            "-o",
            color="crimson",
            markerfacecolor="none",
            markersize=9,
            linewidth=1.2,
            label=f"Pareto front ({len(front)})",
        )
        best = min(front, key=lambda e: e.step_time_s)
        ax.annotate(
            best.layout.describe(),
            (best.memory_gb_per_device, best.step_time_s),
            xytext=(8, -14),
            textcoords="offset points",
            fontsize=8,
            color="crimson",
        )
    times = [e.step_time_s for e in estimates]
    if times and max(times) > 20 * min(times):
        ax.set_yscale("log")
    if cluster.device.kind == "gpu":
        capacity = cluster.device.memory_bytes / GiB
        ax.axvline(capacity, color="0.4", linestyle="--", linewidth=1)
        ax.text(capacity, ax.get_ylim()[1], " device memory", va="top", fontsize=8)
        # layouts needing many times the device's memory would squeeze the ones that matter into a sliver
        right = max([3 * capacity] + [e.memory_gb_per_device * 1.05 for e in fitting])
        beyond = sum(e.memory_gb_per_device > right for e in estimates)
        if beyond:
            ax.set_xlim(0, right)
            ax.text(
                right,
                ax.get_ylim()[0],
                f"{beyond} layouts beyond {right:.0f} GiB ",
                ha="right",
                va="bottom",
                fontsize=7,
            )
    memory = "params + grads + optimizer per process" if cluster.device.kind == "cpu" else "memory per device"
    ax.set_xlabel(f"predicted {memory} (GiB)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return front
