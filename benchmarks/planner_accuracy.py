"""How close the planner's predictions are to what actually happens.

python benchmarks/planner_accuracy.py cpu [--steps 8 --repeats 3]
    Trains a small model with the real trainer on local gloo ranks (forked, one thread each,
    as benchmarks/parallel_overhead.py does) in many layouts (1 to 8 processes), and prints
    the predicted against the measured step time (median of the steps after the first two;
    the median of --repeats runs, round-robin, since the machine is shared) and memory per
    rank (params + grads + optimizer state, from DIR/state_bytes.json: what "memory" means on
    cpu-local). Then, over all the layouts, how well the planner picks: the Spearman rank
    correlation between predicted and measured step time, and the regret of its first choice
    (the measured step time of the predicted-fastest layout over the best measured, minus 1),
    for the medians and for each round on its own.

python benchmarks/planner_accuracy.py published [--no-search]
    Predicted against reported throughput per GPU of published large runs
    (meshlm.plan.published; figures from memory), and the planner's own best layout.

python benchmarks/planner_accuracy.py gpu [--out DIR]
    On a GPU machine: kernel rates against the device preset (GEMM shapes, elementwise
    bandwidth, flash attention, per-kernel host overhead) and single-GPU meshlm training
    runs against the planner (step time, and peak allocated memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from parallel_overhead import MODEL

from meshlm.config import load_config
from meshlm.plan.cost import estimate
from meshlm.plan.layout import Layout, Workload, meshlm_software
from meshlm.plan.measure import regret, spearman

# ----------------------------------------------------------------------------- cpu

# the workload of parallel_overhead.py, whose layouts the planner is checked against
CPU_MODEL = MODEL

CPU_LAYOUTS = [
    ("single process", 1, []),
    ("dp2 (DDP)", 2, ["parallel.dp=2"]),
    ("dp2 zero1", 2, ["parallel.dp=2", "parallel.zero=1"]),
    ("dp2 zero3 (FSDP2)", 2, ["parallel.dp=2", "parallel.zero=3"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("tp2 + sp", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2 1f1b", 2, ["parallel.pp=2"]),
    ("single, checkpointing", 1, ["train.activation_checkpointing=true"]),
    ("dp4", 4, ["parallel.dp=4"]),
    ("dp2 x tp2", 4, ["parallel.dp=2", "parallel.tp=2"]),
    ("dp2 x pp2", 4, ["parallel.dp=2", "parallel.pp=2"]),
    ("tp2 x pp2", 4, ["parallel.tp=2", "parallel.pp=2"]),
    ("pp4 1f1b", 4, ["parallel.pp=4"]),
    ("dp2 x tp2 x pp2", 8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"]),
    ("dp8", 8, ["parallel.dp=8", "train.micro_batch=2"]),
]


def _train(rank, cfg, out):
    from meshlm.train.trainer import train

    train(cfg, out, log=lambda *a, **k: None)


def measure_cpu(cfg, world: int, out: Path) -> tuple[float, list[float], int]:
    from meshlm.distributed.spawn import run_distributed

    if world == 1:
        _train(0, cfg, out)
    else:
        run_distributed(_train, world, cfg, out, timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    held = json.loads((out / "state_bytes.json").read_text())
    state = max(r["params"] + r["grads"] + r["optimizer"] for r in held)
    return statistics.median(times[2:] or times), times, state


def _cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(max_wait: float = 90.0, threshold: float = 0.15) -> float:
    """Wait (up to max_wait seconds) until the machine's CPUs are mostly idle: other programs
    on a shared machine would otherwise be measured as the layout's slowness. Returns the busy
    fraction of the last second looked at."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    deadline = time.time() + max_wait
    while True:
        b0, t0 = _cpu_busy()
        time.sleep(1.0)
        b1, t1 = _cpu_busy()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy <= threshold or time.time() > deadline:
            return busy


def layout_of(cfg, world: int) -> Layout:
    from meshlm.distributed.dims import parallel_dims_from_config

    dims = parallel_dims_from_config(cfg, world)
    p = cfg.parallel
    v = 2 if p.pp_schedule == "zbv" else p.pp_virtual_stages
    return Layout(
        dims.dp,
        dims.tp,
        dims.pp,
        dims.zero,
        cfg.train.micro_batch,
        "full" if cfg.train.activation_checkpointing else "none",
        dims.sequence_parallel,
        p.pp_schedule,
        v,
        dims.dp_replicate,
    )


def cpu(args) -> None:
    import torch

    from meshlm.data.prepare import prepare_data
    from meshlm.plan.cpu_local import cpu_local_cluster

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="meshlm-plan-accuracy-"))
    base = CPU_MODEL + [f"train.steps={args.steps}", f'data.cache_dir="{work / "cache"}"']
    cfg0 = load_config(None, base)
    prepare_data(cfg0.data, cfg0.model.vocab_size, log=lambda *a, **k: None)
    if args.remeasure:
        wait_for_quiet()
    cluster1 = cpu_local_cluster(1, remeasure=args.remeasure, log=print)
    dev = cluster1.device
    print(
        f"# planner accuracy on cpu-local: {platform.machine()} '{dev.name}', {dev.cores} cores, torch {torch.__version__}, "
        f"gloo, 1 thread per rank; load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"# model d{cfg0.model.d_model} L{cfg0.model.n_layers} heads {cfg0.model.n_heads}/{cfg0.model.kv_heads} "
        f"vocab {cfg0.model.vocab_size}, global batch {cfg0.train.global_batch} x {cfg0.data.seq_len}; "
        f"step time = median of steps 3..{args.steps}, median of {args.repeats} runs"
    )
    print(
        "| layout | ranks | predicted step (s) | measured step (s), median of runs | error | best run (s) | error "
        "| predicted memory/rank (MB) | measured (MB) | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    # Round-robin over the layouts, each run started once the machine is quiet (or after
    # --quiet-wait seconds): a burst of other work then spoils one run of a layout, not all of
    # them. Each layout keeps the median of its runs, and the best run (the least disturbed).
    runs: dict[str, list[float]] = {name: [] for name, _, _ in CPU_LAYOUTS}
    steps: dict[str, list[list[float]]] = {name: [] for name, _, _ in CPU_LAYOUTS}
    states: dict[str, int] = {}
    loads = []
    for r in range(args.repeats):
        for name, world, overrides in CPU_LAYOUTS:
            loads.append(wait_for_quiet(args.quiet_wait))
            median, times, states[name] = measure_cpu(
                load_config(None, base + overrides), world, work / f"{name.replace(' ', '_')}_{r}"
            )
            runs[name].append(median)
            steps[name].append(times)
            print(f"# round {r + 1}, {name}: {median:.3f} s", flush=True)
    measured = {name: statistics.median(times) for name, times in runs.items()}
    best_run = {name: min(times) for name, times in runs.items()}
    rows, saved = [], {}
    predicted = {}
    for name, world, overrides in CPU_LAYOUTS:
        cfg = load_config(None, base + overrides)
        state = states[name]
        workload = Workload(cfg.model, cfg.train.global_batch, cfg.data.seq_len)
        layout = layout_of(cfg, world)
        est = estimate(workload, layout, cpu_local_cluster(world), meshlm_software("cpu"))
        t_err = est.step_time_s / measured[name] - 1
        b_err = est.step_time_s / best_run[name] - 1
        m_err = est.memory.state / state - 1
        rows.append((name, t_err, m_err, b_err))
        predicted[name] = est.step_time_s
        saved[name] = {
            "world": world,
            "measured_s": measured[name],
            "best_run_s": best_run[name],
            "runs_s": runs[name],
            "steps_s": steps[name],
            "predicted_s": est.step_time_s,
            "state_bytes": state,
            "predicted_state_bytes": est.memory.state,
            "breakdown": est.breakdown,
        }
        print(
            f"| {name} | {world} | {est.step_time_s:.3f} | {measured[name]:.3f} | {100 * t_err:+.0f}% | "
            f"{best_run[name]:.3f} | {100 * b_err:+.0f}% | "
            f"{est.memory.state / 1e6:.2f} | {state / 1e6:.2f} | {100 * m_err:+.1f}% |",
            flush=True,
        )
    print(
        f"\n{sum(abs(r[1]) <= 0.25 for r in rows)} of {len(rows)} layouts within 25% of the median run "
        f"(median error {100 * statistics.median(r[1] for r in rows):+.0f}%), "
        f"{sum(abs(r[3]) <= 0.25 for r in rows)} of the best run (median error "
        f"{100 * statistics.median(r[3] for r in rows):+.0f}%); memory within "
        f"{100 * max(abs(r[2]) for r in rows):.1f}% on every layout; load average {os.getloadavg()[0]:.1f} at the "
        f"end, CPUs busy {100 * statistics.median(loads):.0f}% (median) before the runs"
    )
    names = [name for name, _, _ in CPU_LAYOUTS]
    summary = {
        "median of runs": picking(names, predicted, measured),
        "best run": picking(names, predicted, best_run),
        "each round": [picking(names, predicted, {n: runs[n][r] for n in names}) for r in range(args.repeats)],
    }
    for label in ("median of runs", "best run"):
        p = summary[label]
        print(
            f"Picking over the {len(names)} layouts ({label}): Spearman {p['spearman']:.2f} (target >= 0.8), regret "
            f"{100 * p['regret']:.0f}% (target <= 10%): the planner's first choice '{p['first']}' measured "
            f"{p['first_s']:.3f} s, the best measured '{p['best']}' {p['best_s']:.3f} s"
        )
    print(
        "each round alone: "
        + "; ".join(f"Spearman {p['spearman']:.2f}, regret {100 * p['regret']:.0f}%" for p in summary["each round"])
    )
    # Among layouts of one process count (what --measure-top and parallel = "auto" compare), other
    # programs on a shared machine take the same share of the CPUs from each layout.
    summary["same process count"] = {}
    for world in sorted({w for _, w, _ in CPU_LAYOUTS}):
        group = [name for name, w, _ in CPU_LAYOUTS if w == world]
        if len(group) >= 3:
            p = picking(group, predicted, measured)
            summary["same process count"][world] = p
            print(
                f"{world} processes ({len(group)} layouts, median of runs): Spearman {p['spearman']:.2f}, regret "
                f"{100 * p['regret']:.0f}% (first choice '{p['first']}', best measured '{p['best']}')"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"layouts": saved, "summary": summary}, indent=1))


def picking(names: list[str], predicted: dict[str, float], measured: dict[str, float]) -> dict:
    """How well the predicted ranking picks: Spearman, regret, the first choice and the best."""
    pred, meas = [predicted[n] for n in names], [measured[n] for n in names]
    first, best = min(names, key=predicted.get), min(names, key=measured.get)
    return {
        "spearman": spearman(pred, meas),
        "regret": regret(pred, meas),
        "first": first,
        "first_s": measured[first],
        "best": best,
        "best_s": measured[best],
    }


# ----------------------------------------------------------------------------- published runs


def published(args) -> None:
    from meshlm.plan.published import RUNS, compare

    print(
        "| run | GPUs | layout (theirs) | reported TFLOP/s/GPU | predicted | error | planner's best layout | its speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for run in RUNS:
        c = compare(run, with_search=not args.no_search)
        errors.append(c.error)
        best = f"{c.best_layout.describe()} | {c.predicted_step_s / c.best_step_s:.2f}x" if c.best_layout else "- | -"
        print(
            f"| {run.name} | {run.gpus} | {c.layout.describe()} | {run.reported_tflops:.0f} | {c.predicted_tflops:.0f} | "
            f"{100 * c.error:+.0f}% | {best} |",
            flush=True,
        )
    print(
        f"\n{sum(abs(e) <= 0.15 for e in errors)} of {len(errors)} runs within 15%; "
        f"median error {100 * statistics.median(errors):+.0f}%"
    )


# ----------------------------------------------------------------------------- gpu

GEMM_SHAPES = [
    (8192, 8192, 8192),
    (4096, 4096, 4096),
    (2048, 2048, 2048),
    (1024, 1024, 1024),
    (512, 512, 512),
    (8192, 4096, 4096),
    (8192, 4096, 1024),
    (8192, 4096, 14336),
    (8192, 14336, 4096),  # llama3-8b, 2 x 4096 tokens
    (8192, 8192, 1024),
    (8192, 8192, 3584),
    (8192, 3584, 8192),  # llama3-70b tp8
    (8192, 16384, 2048),
    (8192, 16384, 6656),
    (8192, 6656, 16384),  # llama3-405b tp8
    (2048, 12288, 4608),
    (2048, 1536, 12288),
    (2048, 12288, 6144),
    (2048, 6144, 12288),  # gpt3-175b tp8, mb 1
    (8192, 2048, 2048),
    (8192, 2048, 512),
    (8192, 2048, 8192),
    (8192, 8192, 2048),  # llama-1b shapes, 4 x 2048
    (16384, 768, 768),
    (16384, 768, 3072),
    (16384, 3072, 768),
    (16384, 768, 32768),  # gpt2-124m, 16 x 1024
]

GPU_RUNS = [
    (
        "llama-1b, mb4, checkpointing",
        "llama-1b",
        ["train.micro_batch=4", "train.global_batch=8", "train.activation_checkpointing=true"],
    ),
    (
        "llama-1b, mb4",
        "llama-1b",
        ["train.micro_batch=4", "train.global_batch=8", "train.activation_checkpointing=false"],
    ),
    (
        "llama-1b, mb1",
        "llama-1b",
        ["train.micro_batch=1", "train.global_batch=4", "train.activation_checkpointing=false"],
    ),
    (
        "gpt2-124m, mb16",
        "gpt2-124m",
        [
            "train.micro_batch=16",
            "train.global_batch=16",
            "train.activation_checkpointing=false",
            "model.vocab_size=32768",
        ],
    ),
    (
        "llama d3072 L8, seq 4096, mb2",
        "llama-1b",
        [
            "model.d_model=3072",
            "model.n_layers=8",
            "model.n_heads=24",
            "model.ffn_hidden=8192",
            "model.max_seq_len=4096",
            "data.seq_len=4096",
            "train.micro_batch=2",
            "train.global_batch=4",
            "train.activation_checkpointing=false",
        ],
    ),
]


def _cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def gpu_kernels(dev) -> dict:
    import torch
    import torch.nn.functional as F

    out: dict = {
        "gemm": [],
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    for M, K, N in GEMM_SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        t = _cuda_time(lambda a=a, b=b: a @ b)
        t_dw = _cuda_time(lambda a=a, dy=dy: a.t() @ dy)  # the weight-gradient layout: (K x M) @ (M x N)
        pred = 2 * M * K * N / dev.gemm_flops + dev.gemm_overhead_s
        out["gemm"].append(
            {
                "shape": [M, K, N],
                "seconds": t,
                "tflops": 2 * M * K * N / t / 1e12,
                "dw_tflops": 2 * M * K * N / t_dw / 1e12,
                "predicted_s": pred,
            }
        )
        del a, b, dy
    # elementwise bandwidth (bf16 and fp32 add: read 2, write 1)
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        n = 1 << 28 if size == 2 else 1 << 27
        x, y = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
        t = _cuda_time(lambda x=x, y=y: x + y)
        out[f"add_{size}B_GBps"] = 3 * n * size / t / 1e9
        del x, y
    x = torch.randn(8 * 2048, 4096, device="cuda", dtype=torch.float32)
    w = torch.ones(4096, device="cuda")
    t = _cuda_time(lambda: F.rms_norm(x, (4096,), w))
    out["rms_norm_fp32_GBps"] = 2 * x.numel() * 4 / t / 1e9
    # flash attention (SDPA), causal, forward + backward: real work 3.5 x (half of 4 B H T^2 hd)
    out["attention"] = []
    for B, H, T, hd in (
        (4, 32, 2048, 64),
        (4, 16, 2048, 128),
        (1, 32, 8192, 128),
        (2, 24, 4096, 128),
        (16, 12, 1024, 64),
    ):
        q, k, v = (torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)

        def attn(q=q, k=k, v=v, g=g):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

        t = _cuda_time(attn, iters=10)
        flops = 3.5 * 2 * B * H * T * T * hd
        out["attention"].append(
            {
                "shape": [B, H, T, hd],
                "seconds": t,
                "tflops": flops / t / 1e12,
                "predicted_s": flops / dev.attention_flops,
            }
        )
        del q, k, v, g
    # host dispatch: forward + backward of a chain of tiny ops (launch-bound)
    x = torch.randn(16, device="cuda", requires_grad=True)

    def chain():
        y = x
        for _ in range(50):
            y = y * 1.0001
        y.sum().backward()

    for _ in range(3):
        chain()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        chain()
    torch.cuda.synchronize()
    out["host_op_overhead_us"] = (time.perf_counter() - t0) / 20 / 102 * 1e6
    return out


def gpu_training(cluster, work: Path, steps: int, profile_dir: Path | None = None) -> list[dict]:
    import torch

    from meshlm.distributed.env import read_launch_env
    from meshlm.train.trainer import Trainer

    results = []
    for name, config, overrides in GPU_RUNS:
        cfg = load_config(
            config,
            overrides
            + [
                f"train.steps={steps}",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.sample_tokens=0",
                "train.progress=false",
                'train.dtype="bfloat16"',
                "data.max_bytes=20000000",
                "parallel.zero=0",
                "parallel.dp=1",
                f'data.cache_dir="{work / "cache"}"',
            ],
        )
        torch.cuda.empty_cache()
        trainer = Trainer(
            cfg,
            work / name.replace(" ", "_").replace(",", ""),
            overwrite=True,
            env=read_launch_env(),
            log=lambda *a, **k: None,
        )
        times = []
        for step in range(steps):
            if step == 2:
                torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.runner.train_step(step)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated()
        if profile_dir is not None:  # where the time goes, kernel by kernel, for one more step
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.runner.train_step(steps)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60)
            (profile_dir / f"profile_{len(results)}.txt").write_text(table)
        workload = Workload(cfg.model, cfg.train.global_batch, cfg.data.seq_len)
        layout = Layout(1, 1, 1, 0, cfg.train.micro_batch, "full" if cfg.train.activation_checkpointing else "none")
        est = estimate(workload, layout, cluster, meshlm_software("gpu"))
        predicted_mem = est.memory.total - cluster.device.reserve_bytes
        row = {
            "name": name,
            "measured_s": statistics.median(times[2:]),
            "times": times,
            "predicted_s": est.step_time_s,
            "peak_allocated": peak,
            "predicted_memory": predicted_mem,
            "breakdown": est.breakdown,
            "memory": est.to_dict()["memory_breakdown_gb"],
        }
        results.append(row)
        print(
            f"| {name} | {est.step_time_s:.3f} | {row['measured_s']:.3f} | {100 * (est.step_time_s / row['measured_s'] - 1):+.0f}% | "
            f"{predicted_mem / 2**30:.2f} | {peak / 2**30:.2f} | {100 * (predicted_mem / peak - 1):+.0f}% |",
            flush=True,
        )
        del trainer
    return results


def gpu(args) -> None:
    import torch

    from meshlm.plan.clusters import make_cluster

    cluster = make_cluster(args.preset, nodes=1, devices_per_node=1)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="meshlm-plan-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    kernels = gpu_kernels(cluster.device)
    print(f"# {kernels['device']}, torch {torch.__version__}, {kernels['sms']} SMs; preset {args.preset}")
    print("| GEMM M x K x N | measured TFLOP/s | weight-gradient layout | predicted TFLOP/s |")
    print("|---|---|---|---|")
    for g in kernels["gemm"]:
        M, K, N = g["shape"]
        print(
            f"| {M} x {K} x {N} | {g['tflops']:.0f} | {g['dw_tflops']:.0f} | {2 * M * K * N / g['predicted_s'] / 1e12:.0f} |"
        )
    print("| attention B, H, T, hd | measured TFLOP/s | predicted |")
    for a in kernels["attention"]:
        print(
            f"| {a['shape']} | {a['tflops']:.0f} | {3.5 * 2 * a['shape'][0] * a['shape'][1] * a['shape'][2] ** 2 * a['shape'][3] / a['predicted_s'] / 1e12:.0f} |"
        )
    print({k: v for k, v in kernels.items() if k not in ("gemm", "attention")})
    (out_dir / "kernels.json").write_text(json.dumps(kernels, indent=1))
    print("| run | predicted step (s) | measured (s) | error | predicted memory (GiB) | peak allocated (GiB) | error |")
    print("|---|---|---|---|---|---|---|")
    runs = gpu_training(cluster, Path(tempfile.mkdtemp(prefix="meshlm-gpu-runs-")), args.steps, out_dir)
    (out_dir / "training.json").write_text(json.dumps(runs, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("cpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds to wait for idle CPUs before each run (at most)"
    )
    p.add_argument("--remeasure", action="store_true", help="measure cpu-local again instead of using the cache")
    p.add_argument("--json", default=None, help="also write the measured and predicted figures to this file")
    p = sub.add_parser("published")
    p.add_argument("--no-search", action="store_true")
    p = sub.add_parser("gpu")
    p.add_argument("--preset", default="h100-sxm")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    {"cpu": cpu, "published": published, "gpu": gpu}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
