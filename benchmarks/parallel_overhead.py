"""Step time of each parallel layout relative to the single process, same global batch.

Every layout trains the same model on the same data for a few steps on local gloo ranks
(forked, one thread each); the figure is the median step time of the steps after the
warm-up, divided by the single process's. On a 2-core machine, N ranks share 2 cores, so
the ratios show the cost of the extra work and communication, not a speed-up.

The second table compares meshlm's hand-written tensor parallelism with PyTorch's DTensor
`parallelize_module` plan (same split, vocabulary-parallel loss) on tp2, alternating.

    python benchmarks/parallel_overhead.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meshlm.config import load_config
from meshlm.data.prepare import prepare_data
from meshlm.distributed.spawn import run_distributed

MODEL = [
    "model.d_model=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=2048",
    "model.max_seq_len=128",
    "data.seq_len=128",
    "data.max_bytes=2000000",
    "train.micro_batch=4",
    "train.global_batch=16",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
]

LAYOUTS = [
    ("single process", 1, []),
    ("dp2 (DDP)", 2, ["parallel.dp=2"]),
    ("dp2 zero1", 2, ["parallel.dp=2", "parallel.zero=1"]),
    ("dp2 zero2", 2, ["parallel.dp=2", "parallel.zero=2"]),
    ("dp2 zero3 (FSDP2)", 2, ["parallel.dp=2", "parallel.zero=3"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("tp2 + sequence parallel", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2 1f1b", 2, ["parallel.pp=2"]),
    (
        "pp2 interleaved-1f1b v2",
        2,
        ["parallel.pp=2", 'parallel.pp_schedule="interleaved-1f1b"', "parallel.pp_virtual_stages=2"],
    ),
    ("pp2 zbv", 2, ["parallel.pp=2", 'parallel.pp_schedule="zbv"', "parallel.pp_virtual_stages=2"]),
    ("dp2 x tp2", 4, ["parallel.dp=2", "parallel.tp=2"]),
    ("hsdp 2x2", 4, ["parallel.zero=3", "parallel.dp_replicate=2"]),
    ("dp2 x tp2 x pp2", 8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"]),
]


def _train(rank, cfg, out):
    from meshlm.train.trainer import train

    train(cfg, out, log=lambda *a, **k: None)


def step_times(cfg, world: int, out: Path) -> list[float]:
    if world == 1:
        _train(0, cfg, out)
    else:
        run_distributed(_train, world, cfg, out, timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if "step_time_s" in r]


# ----------------------------------------------------------------------------- TP: hand-written vs DTensor


def _tp_compare(rank, cfg, steps):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    from meshlm.model.registry import build_model
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel
    from meshlm.parallel.vocab_parallel import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    group = mesh.get_group()
    ours = build_model(cfg.model, seed=0)
    apply_tensor_parallel(ours, group)
    theirs = build_model(cfg.model, seed=0)
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(use_local_output=False),
    }
    for i in theirs.layers:
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(theirs, mesh, plan)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=False)
    # foreach cannot mix the plan's DTensors with its replicated plain tensors (the norms)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, foreach=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len), generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len), generator=gen)

    def step_ours():
        loss = vocab_parallel_cross_entropy(ours(x), y, group, cfg.model.vocab_size)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()

    def step_theirs():
        with loss_parallel():
            logits = theirs(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad()

    times = {"ours": [], "theirs": []}
    for fn in (step_ours, step_theirs):
        fn()  # warm-up
    for _ in range(steps):
        for name, fn in (("ours", step_ours), ("theirs", step_theirs)):
            dist.barrier()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="meshlm-bench-"))
    base = MODEL + [f"train.steps={args.steps}", f'data.cache_dir="{work / "cache"}"']
    cfg = load_config(None, base)
    prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None)
    print(
        f"# parallel overhead, {platform.machine()}, gloo, 1 thread per rank, torch {torch.__version__}; "
        f"model d{cfg.model.d_model} L{cfg.model.n_layers}, global batch {cfg.train.global_batch} x {cfg.data.seq_len}"
    )
    print("| layout | ranks | median step (s) | ratio to single process |")
    print("|---|---|---|---|")
    reference = None
    for name, world, overrides in LAYOUTS:
        times = step_times(load_config(None, base + overrides), world, work / name.replace(" ", "_"))
        median = statistics.median(times[2:] or times)
        reference = reference or median
        print(f"| {name} | {world} | {median:.3f} | {median / reference:.2f} |", flush=True)

    tp_cfg = load_config(None, base + ["parallel.tp=2"])
    result = run_distributed(_tp_compare, 2, tp_cfg, max(args.steps, 10), timeout=900)[0]
    print()
    print("| tp2 implementation | median step (s) | ratio |")
    print("|---|---|---|")
    print(f"| meshlm hand-written (autograd.Function pairs) | {result['ours']:.4f} | 1.00 |")
    print(
        f"| DTensor parallelize_module + loss_parallel | {result['theirs']:.4f} | {result['theirs'] / result['ours']:.2f} |"
    )


if __name__ == "__main__":
    main()
