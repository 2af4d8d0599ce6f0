"""Checkpoint save / load time and size per layout, and how long a save blocks training.

For each layout: build the trainer, train 2 steps (so the optimizer holds its moments), then

    sync save    Checkpointer.save with train.async_checkpoint=false: training waits for all of it
                 (DCP write of every rank's pieces + rank 0's sha256 manifest + rename)
    async save   with train.async_checkpoint=true: the blocked part is the copy of this rank's
                 pieces to CPU memory; the write continues while 2 more training steps run;
                 "published after" is the time from the save call until the checkpoint is visible
    verify       rank 0's sha256 check of every file against the manifest (done before a load)
    load         Checkpointer.load (DCP read of this layout's boxes, in place), into the same layout

Times are rank 0's; each figure is the median of --repeats. Step times during the async
write show what the background writer costs the training thread (GIL, memory bandwidth).

    python benchmarks/checkpoint_io.py [--size small|medium] [--repeats 3] [--json OUT.json]
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

SIZES = {
    # ~88M parameters (GPU): 3 x 350 MB
    "large": [
        "model.d_model=768",
        "model.n_layers=12",
        "model.n_heads=12",
        "model.n_kv_heads=4",
        "model.vocab_size=8192",
        "data.max_bytes=8000000",
    ],
    # ~6.8M parameters: 3 x 27 MB of float32 state (parameters, exp_avg, exp_avg_sq)
    "medium": [
        "model.d_model=256",
        "model.n_layers=8",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        "model.vocab_size=2048",
        "data.max_bytes=2000000",
    ],
    "small": [
        "model.d_model=128",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.vocab_size=2048",
        "data.max_bytes=2000000",
    ],
}
COMMON = [
    "model.max_seq_len=128",
    "data.seq_len=128",
    "train.micro_batch=4",
    "train.global_batch=16",
    "train.steps=100",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
    "train.checkpoint_every=0",
    "train.keep_checkpoints=2",
]

LAYOUTS = [
    ("single process", 1, []),
    ("dp2 (DDP)", 2, ["parallel.dp=2"]),
    ("dp2 zero1", 2, ["parallel.dp=2", "parallel.zero=1"]),
    ("dp2 zero3 (FSDP2)", 2, ["parallel.dp=2", "parallel.zero=3"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2 1f1b", 2, ["parallel.pp=2"]),
    ("dp2 x tp2", 4, ["parallel.dp=2", "parallel.tp=2"]),
    ("dp4 zero3 (FSDP2)", 4, ["parallel.dp=4", "parallel.zero=3"]),
]


def _bench(rank, cfg, out, repeats):
    import torch.distributed as dist

    from meshlm.train.checkpoint import find_resume_checkpoint
    from meshlm.train.checkpoint_manifest import step_dir
    from meshlm.train.trainer import Trainer

    quiet = lambda *a, **k: None  # noqa: E731
    trainer = Trainer(cfg, out, log=quiet)
    ckpt, runner = trainer.checkpoints, trainer.runner
    step = 0

    def train_steps(n):
        nonlocal step
        times = []
        for _ in range(n):
            t = time.perf_counter()
            runner.train_step(step)
            times.append(time.perf_counter() - t)
            step += 1
        return times

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    base = train_steps(3)[1:]
    rows = {
        "sync_s": [],
        "async_blocked_s": [],
        "async_published_s": [],
        "verify_s": [],
        "load_s": [],
        "step_s": base,
        "step_during_async_s": [],
    }
    for _ in range(repeats):
        barrier()
        cfg.train.async_checkpoint = False
        t = time.perf_counter()
        ckpt.save(step)
        rows["sync_s"].append(time.perf_counter() - t)
        barrier()
        t = time.perf_counter()
        point = find_resume_checkpoint(str(step_dir(out, step)), out, trainer.env, quiet)
        rows["verify_s"].append(time.perf_counter() - t)
        barrier()
        t = time.perf_counter()
        ckpt.load(point)
        rows["load_s"].append(time.perf_counter() - t)
        train_steps(1)
        barrier()
        cfg.train.async_checkpoint = True
        t = time.perf_counter()
        saved = step
        ckpt.save(step)
        rows["async_blocked_s"].append(time.perf_counter() - t)
        published: list[float] = []
        ckpt._pending[0].add_done_callback(lambda _: published.append(time.perf_counter()))
        rows["step_during_async_s"] += train_steps(2)
        ckpt.wait()
        rows["async_published_s"].append(published[0] - t)
        barrier()
    path = step_dir(out, saved)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    data = sum(p.stat().st_size for p in path.glob("*.distcp"))
    return {
        **{k: statistics.median(v) for k, v in rows.items()},
        "bytes": size,
        "distcp_bytes": data,
        "files": len(list(path.glob("*.distcp"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="medium")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="", help="comma-separated substrings of layout names (default: all)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = SIZES[args.size] + COMMON + [f'data.cache_dir="{tmp}/cache"']
        cfg = load_config(None, base)
        prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None)
        n_params = None
        for i, (name, world, layout) in enumerate(LAYOUTS):
            if args.layouts and not any(s in name for s in args.layouts.split(",")):
                continue
            cfg = load_config(None, base + layout)
            out = Path(tmp) / f"run{i}"
            row = (
                run_distributed(_bench, world, cfg, out, args.repeats)[0]
                if world > 1
                else _bench(0, cfg, out, args.repeats)
            )
            if n_params is None:
                from meshlm.model.stats import count_params

                n_params = count_params(cfg.model)
            results.append({"layout": name, "world": world, **row})
            print(
                f"{name:20s} world {world}: {row['bytes'] / 2**20:6.1f} MiB in {row['files']} data file(s); "
                f"sync save {row['sync_s']:.3f} s, verify {row['verify_s']:.3f} s, load {row['load_s']:.3f} s; "
                f"async: blocked {row['async_blocked_s']:.3f} s, published after {row['async_published_s']:.3f} s; "
                f"step {row['step_s']:.3f} s, during async write {row['step_during_async_s']:.3f} s",
                flush=True,
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\nmachine: {platform.machine()}, {device}, {torch.get_num_threads()} thread(s) per rank, "
        f"torch {torch.__version__}; model {args.size} ({n_params / 1e6:.2f}M parameters)"
    )
    print(
        "\n| layout | ranks | size (MiB) | data files | sync save (s) | verify (s) | load (s) | async: blocked (s) | "
        "async: published after (s) | step (s) | step during async write (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['layout']} | {r['world']} | {r['bytes'] / 2**20:.1f} | {r['files']} | {r['sync_s']:.3f} | "
            f"{r['verify_s']:.3f} | {r['load_s']:.3f} | {r['async_blocked_s']:.3f} | {r['async_published_s']:.3f} | "
            f"{r['step_s']:.3f} | {r['step_during_async_s']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
