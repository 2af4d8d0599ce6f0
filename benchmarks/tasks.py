"""Per built-in task: test-split score and training time of each classical baseline and of
fine-tuned small backbones (with and without pretraining), side by side; and the fine-tuning
throughput of dp2 against one process. Results: docs/benchmarks.md ("Tasks").

    python benchmarks/tasks.py [--tasks classify ner srl] [--cache .meshlm-cache] [--epochs 4]
    python benchmarks/tasks.py --throughput        # dp2 vs 1 process, alternating rounds

The machine is shared and noisy: times are wall-clock seconds of one run each; the throughput
ratio is the median of alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from meshlm.tasks.baselines import METHODS, run
from meshlm.tasks.datasets import builtin_files
from meshlm.tasks.formats import read_examples


def meshlm(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return proc.stdout


def finetuned(task: str, files: dict, out: Path, backbone: list[str], extra: list[str]) -> dict:
    started = time.perf_counter()
    meshlm(
        "finetune",
        "--task",
        task,
        "--train",
        str(files["train"]),
        "--valid",
        str(files["valid"]),
        "--out",
        str(out),
        *backbone,
        *[a for x in extra for a in ("--set", x)],
    )
    seconds = time.perf_counter() - started
    scores = json.loads(
        meshlm("eval", "--run", str(out), "--data", str(files["test"]), "--json").strip().splitlines()[-1]
    )
    return {"scores": scores, "train_seconds": seconds}


def untrained_backbone(cache: Path) -> Path:
    """The default backbone's architecture and tokenizer with freshly initialised weights."""
    from meshlm.artifacts.weights_file import save_weights
    from meshlm.model.registry import build_model
    from meshlm.tasks.default_backbone import default_backbone

    pretrained = default_backbone(cache)
    out = cache / "backbones" / (pretrained.name + "-untrained")
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        from meshlm.artifacts.run_dir import load_run_config

        cfg = load_run_config(pretrained)
        for name in ("config.toml", "tokenizer.json"):
            (out / name).write_bytes((pretrained / name).read_bytes())
        save_weights(build_model(cfg.model, seed=0).state_dict(), cfg.model, out / "model.safetensors")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["classify", "ner", "srl"])
    p.add_argument("--cache", default=".meshlm-cache")
    p.add_argument("--out", default="runs/bench-tasks")
    p.add_argument("--set", dest="extra", action="append", default=[])
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cache, out = Path(args.cache), Path(args.out)
    cache_set = [f'data.cache_dir="{cache}"']
    if args.throughput:
        return throughput(cache, out, args.rounds, cache_set)
    from meshlm.tasks.default_backbone import default_backbone

    pretrained, untrained = default_backbone(cache), untrained_backbone(cache)
    for task in args.tasks:
        files = builtin_files(task, cache)
        train, _ = read_examples(files["train"], task)
        test, _ = read_examples(files["test"], task)
        rows = [run(m, task, train, test) for m in METHODS[task]]
        for name, bb in (("llama (pretrained)", pretrained), ("llama (untrained)", untrained)):
            r = finetuned(task, files, out / f"{task}-{bb.name}", ["--from", str(bb)], cache_set + args.extra)
            rows.append({"method": name, "task": task, **r})
        for r in rows:
            s = r["scores"]
            score = s.get("accuracy", s.get("f1"))
            print(
                json.dumps(
                    {
                        "task": task,
                        "method": r["method"],
                        "score": round(score, 4),
                        "train_s": round(r["train_seconds"], 1),
                    }
                )
            )


def throughput(cache: Path, out: Path, rounds: int, cache_set: list[str]) -> None:
    """Fine-tuning seconds per step, 1 process vs dp2, alternating rounds (median)."""
    from meshlm.tasks.default_backbone import default_backbone

    files, bb = builtin_files("classify", cache), default_backbone(cache)
    common = ["--task", "classify", "--train", str(files["train"]), "--valid", str(files["valid"]), "--from", str(bb)]
    sets = [*cache_set, "task.epochs=0", "train.steps=30", "train.eval_every=1000", "train.progress=false"]
    times = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):
            started = time.perf_counter()
            layout = ["--nproc", "2", "--set", "parallel.dp=2"] if n == 2 else []
            meshlm(
                "finetune", *common, "--out", str(out / f"tp-{n}"), *layout, *[a for x in sets for a in ("--set", x)]
            )
            times[n].append(time.perf_counter() - started)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(json.dumps({"one_process_s": one, "dp2_s": two, "speedup": one / two}))


if __name__ == "__main__":
    main()
