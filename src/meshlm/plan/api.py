"""The planner as a library call: `plan(workload, cluster)` searches, `plan(..., layout=...)` evaluates one.

from meshlm.plan import Workload, make_cluster, model_preset, plan
result = plan(Workload(model_preset("llama3-70b"), global_batch=512, seq_len=8192),
              make_cluster("dgx-h100", nodes=8))
print(result.text(top=5))
best = result.best            # an Estimate: .layout, .step_time_s, .memory, .fits, ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from meshlm.config import Config, ConfigError, apply_overrides, load_config, validate
from meshlm.model.registry import family_spec
from meshlm.model.tp_rules import check_layout_supported, check_tp_divides
from meshlm.plan.chart import pareto_front, plot_candidates
from meshlm.plan.clusters import make_cluster
from meshlm.plan.cost import Estimate
from meshlm.plan.hardware import CPU_LOCAL, Cluster
from meshlm.plan.layout import Layout, Software, Workload, check_meshlm_layout, parse_layout, software_for
from meshlm.plan.measure import DEFAULT_STEPS, Measured, check_measurable, measure_candidates
from meshlm.plan.report import explain, format_table, header, runner_up, to_json
from meshlm.plan.search import evaluate, search
from meshlm.plan.serve import ServeTargets, format_serving, plan_serving, serving_json


@dataclass
class PlanResult:
    workload: Workload
    cluster: Cluster
    software: Software
    candidates: list[Estimate]
    evaluated: int
    estimates: list[Estimate] = field(default_factory=list)  # every layout evaluated (for the chart)
    config: Config | None = None  # the config planned (what --measure-top trains)
    meshlm_only: bool = False

    @property
    def best(self) -> Estimate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    @property
    def runner_up(self) -> Estimate | None:
        return runner_up(self.candidates)

    def explanation(self) -> str:
        return explain(self.candidates[0], self.runner_up) if self.candidates else ""

    def text(self, top: int = 10) -> str:
        what = "1 layout evaluated" if self.evaluated == 1 else f"{self.evaluated} layouts evaluated"
        return "\n".join(
            [
                header(self.workload, self.cluster, self.software) + f"; {what}",
                format_table(self.candidates, top),
                self.explanation(),
            ]
        )

    def to_json(self, top: int = 10) -> dict:
        return to_json(self.candidates, self.workload, self.cluster, self.software, top, self.evaluated)

    def chart(self, path: Path | str) -> list[Estimate]:
        """A PNG of every layout evaluated (plan/chart.py); returns the Pareto front."""
        estimates = list(self.estimates or self.candidates)
        if self.meshlm_only:  # the front shows only layouts meshlm runs
            while True:
                bad = [e for e in pareto_front(estimates) if not _runs(e, self.workload, self.cluster)]
                if not bad:
                    break
                estimates = [e for e in estimates if all(e is not b for b in bad)]
        title = header(self.workload, self.cluster, self.software).removeprefix("meshlm plan: ")
        return plot_candidates(estimates, self.cluster, Path(path), _wrap(title))

    def measure(self, top: int, steps: int = DEFAULT_STEPS, log=print) -> list[Measured]:
        """Train the `top` best-predicted layouts for `steps` steps on this machine (plan/measure.py)."""
        if self.config is None:
            raise ConfigError("measuring needs the config that was planned: plan with plan_from_args or pass config=.")
        check_measurable(self.cluster)
        return measure_candidates(self.config, self.workload, self.candidates, top, steps, log)


def _runs(e: Estimate, workload: Workload, cluster: Cluster) -> bool:
    try:
        check_meshlm_layout(e.layout, workload, cluster.world_size)
    except ConfigError:
        return False
    return True


def _wrap(text: str, width: int = 110) -> str:
    words, lines = text.split(" "), [""]
    for w in words:
        if len(lines[-1]) + len(w) + 1 > width:
            lines.append("")
        lines[-1] = (lines[-1] + " " + w).strip()
    return "\n".join(lines)


def plan(
    workload: Workload,
    cluster: Cluster,
    software: Software | str | None = None,
    layout: Layout | None = None,
    top: int | None = None,
    meshlm_only: bool | None = None,
    config: Config | None = None,
) -> PlanResult:
    """Search every layout (or evaluate `layout`) of `workload` on `cluster`. `config`: the meshlm
    config the workload comes from, for PlanResult.measure."""
    if workload.global_batch <= 0 or workload.seq_len <= 0:
        raise ConfigError(
            f"the global batch ({workload.global_batch}) and the sequence length ({workload.seq_len}) must be positive."
        )
    sw = software if isinstance(software, Software) else software_for(software, cluster.device.kind)
    meshlm_only = sw.name == "meshlm" if meshlm_only is None else meshlm_only
    if layout is not None:
        check_layout(layout, workload, cluster, sw, meshlm_only)
        one = [evaluate(workload, layout, cluster, sw)]
        return PlanResult(workload, cluster, sw, one, 1, one, config, meshlm_only)
    result = search(workload, cluster, sw, top=top, meshlm_only=meshlm_only)
    return PlanResult(workload, cluster, sw, result.candidates, result.evaluated, result.estimates, config, meshlm_only)


def check_layout(layout: Layout, workload: Workload, cluster: Cluster, sw: Software, meshlm_only: bool) -> None:
    """One clear error for a layout that cannot run on this cluster (and, for meshlm, in meshlm).
    A layout the model's family cannot run comes first, in the family's own words."""
    m = workload.model
    check_layout_supported(m, layout.tp, layout.pp, layout.sequence_parallel)
    n_blocks = family_spec(m).n_blocks(m)
    if layout.world_size != cluster.world_size:
        raise ConfigError(
            f"the layout needs dp x tp x pp = {layout.dp} x {layout.tp} x {layout.pp} = {layout.world_size} devices, but the "
            f"cluster has {cluster.world_size} ({cluster.nodes} node(s) x {cluster.devices_per_node}). Change the degrees "
            f"or --nodes / --devices-per-node."
        )
    if workload.global_batch % (layout.dp * layout.micro_batch):
        raise ConfigError(
            f"the global batch ({workload.global_batch}) must be a multiple of dp x micro_batch = {layout.dp} x "
            f"{layout.micro_batch} = {layout.dp * layout.micro_batch}; change --global-batch or the layout."
        )
    check_tp_divides(m, layout.tp)
    micro = layout.microbatches(workload.global_batch)
    if layout.pp > 1 and micro < layout.pp:
        raise ConfigError(
            f"a pipeline of pp={layout.pp} stages needs at least {layout.pp} micro-batches per step, but "
            f"global batch / (dp x micro_batch) = {micro}; raise --global-batch or lower micro_batch."
        )
    if layout.pp > 1 and layout.pp * max(1, layout.virtual_stages) > n_blocks:
        raise ConfigError(
            f"pp x virtual stages = {layout.pp} x {layout.virtual_stages} exceeds the model's {n_blocks} blocks."
        )
    if layout.zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero must be 0, 1, 2 or 3, got {layout.zero}.")
    if layout.dp % layout.dp_replicate:
        raise ConfigError(f"dp_replicate ({layout.dp_replicate}) must divide dp ({layout.dp}).")
    if meshlm_only:
        try:
            check_meshlm_layout(layout, workload, cluster.world_size)
        except ConfigError as e:
            raise ConfigError(f"meshlm cannot run the layout {layout.describe()}: {e}") from None


def plan_from_args(args) -> PlanResult:
    """Resolve the CLI's arguments (see commands.py) and plan."""
    from meshlm.plan.models import model_preset

    if args.model:
        cfg = Config(model=model_preset(args.model))
        apply_overrides(cfg, args.overrides)
        if args.global_batch is None or args.seq_len is None:
            raise ConfigError(
                "with --model, give the workload too: --global-batch (sequences per optimizer step) and "
                "--seq-len (tokens per sequence), e.g. --global-batch 1024 --seq-len 4096."
            )
    else:
        cfg = load_config(args.config, args.overrides)
    for flag, value in (("--global-batch", args.global_batch), ("--seq-len", args.seq_len)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    seq_len = args.seq_len or cfg.data.seq_len
    if seq_len > cfg.model.max_seq_len:  # the question is about this length: plan the model that can take it
        if not args.model:
            print(
                f"meshlm plan: planning for --seq-len {seq_len}: model.max_seq_len raised from "
                f"{cfg.model.max_seq_len} to {seq_len}",
                file=sys.stderr,
            )
        cfg.model.max_seq_len = seq_len
    cfg.data.seq_len = seq_len
    validate(cfg)
    cluster = _cluster_from_args(args)
    global_batch = args.global_batch or cfg.train.global_batch or cfg.train.micro_batch * cluster.world_size
    workload = Workload(cfg.model, global_batch, seq_len)
    # Accelerators train in bfloat16 (mixed precision); a CPU plan follows the config.
    dtype = args.dtype or (cfg.train.dtype if cluster.device.kind == "cpu" else "bfloat16")
    sw = software_for(args.software, cluster.device.kind, dtype)
    layout = parse_layout(args.layout, cluster.world_size) if args.layout else None
    meshlm_only = sw.name == "meshlm" and not args.all_layouts
    cfg.train.global_batch = global_batch
    top = max(args.top, getattr(args, "measure_top", 0) or 0)
    return plan(workload, cluster, sw, layout, top=top, meshlm_only=meshlm_only, config=cfg)


def _cluster_from_args(args) -> Cluster:
    """The cluster the plan is for: `--cluster` (cpu-local: this machine's cores, measured once)."""
    return make_cluster(
        args.cluster,
        args.nodes,
        args.devices_per_node,
        remeasure=args.remeasure,
        world_size=None if args.cluster != CPU_LOCAL or args.devices_per_node else _cores(),
        log=lambda message: print(message, file=sys.stderr),
    )


def serve_from_args(args) -> tuple[str, dict]:
    """`meshlm plan --serve`: (the table, the JSON object) for the CLI's arguments (plan/serve.py)."""
    from meshlm.plan.models import model_preset

    if args.model:
        cfg = Config(model=model_preset(args.model))
        apply_overrides(cfg, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    m = cfg.model
    prompt = args.prompt_len or min(512, m.max_seq_len // 2)
    gen = args.gen_len or min(128, m.max_seq_len - prompt)
    if prompt <= 0 or gen <= 0 or args.max_batch <= 0:
        raise ConfigError(
            f"--prompt-len ({prompt}), --gen-len ({gen}) and --max-batch ({args.max_batch}) must be positive."
        )
    validate(cfg)
    cluster = _cluster_from_args(args)
    targets = ServeTargets(prompt, gen, args.max_ttft_ms, args.min_tokens_per_s, args.max_tpot_ms, args.max_batch)
    rows = plan_serving(m, cluster, targets)
    return format_serving(m, cluster, targets, rows), serving_json(m, cluster, targets, rows)


def _cores() -> int:
    from meshlm.plan.cpu_local import cores

    return cores()


__all__ = ["PlanResult", "plan", "plan_from_args", "serve_from_args", "check_layout"]
