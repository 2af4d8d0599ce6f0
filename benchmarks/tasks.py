"""Per built-in task: test-split score and training time of each classical baseline and of
fine-tuned small backbones of two families, each pretrained on the default corpus and untrained,
side by side; the fine-tuning throughput of dp2 against one process; and the predict throughput
of a task model at --nproc 2 against 1. Results: docs/benchmarks.md ("Tasks").

    python benchmarks/tasks.py [--tasks classify ner srl] [--methods ...] [--cache .meshlm-cache]
    python benchmarks/tasks.py --throughput        # fine-tuning dp2 vs 1 process, predict --nproc 2 vs 1

The backbones: the default backbone (tiny-cpu's llama, 800 steps of 16 x 128 tokens on the
default corpus: tasks/default_backbone.py) and lstm-tiny widened to 192 units (about the same 1.0M parameters) pretrained the same way (the same corpus
and tokenizer, 800 steps of 16 x 128 tokens, its own learning rate), each with an untrained twin
(the same architecture and tokenizer, freshly initialised weights). Each is fine-tuned with the
library's defaults (`meshlm finetune --from BACKBONE`, nothing else).

The machine is shared and noisy: times are wall-clock seconds of one run each; throughput
ratios are medians of alternating rounds. Every row is also appended to <out>/results.jsonl,
so that runs split over several invocations (--methods) make one table (--table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from meshlm.tasks.baselines import METHODS, run
from meshlm.tasks.datasets import builtin_files
from meshlm.tasks.formats import read_examples

BACKBONES = ("llama", "llama-untrained", "lstm", "lstm-untrained")
# lstm-tiny widened to 192 (0.99M parameters, the default llama has 1.00M), pretrained with the
# default backbone's budget and batches (tiny-cpu: 800 steps of 16 x 128 tokens).
LSTM_PRETRAIN = [
    "model.d_embed=192",
    "model.d_hidden=192",
    "train.steps=800",
    "data.seq_len=128",
    "train.micro_batch=16",
    "train.global_batch=16",
    "train.eval_every=200",
    "train.sample_tokens=0",
    "train.checkpoint_every=0",
    "train.progress=false",
]
NAMES = {
    "tfidf-lr": "TF-IDF + logistic regression",
    "maxent": "MaxEnt (meshlm maxent classifier)",
    "crf": "CRF (sklearn-crfsuite)",
    "hmm": "supervised HMM (meshlm hmm)",
    "llama": "llama 4x128, pretrained (the default backbone)",
    "llama-untrained": "llama 4x128, untrained",
    "lstm": "lstm 2x192, pretrained",
    "lstm-untrained": "lstm 2x192, untrained",
}


def meshlm(*args) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"meshlm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def sets(items: list[str]) -> list[str]:
    return [a for x in items for a in ("--set", x)]


def finetuned(task: str, files: dict, out: Path, backbone: Path, extra: list[str]) -> dict:
    started = time.perf_counter()
    common = ["--task", task, "--train", str(files["train"]), "--valid", str(files["valid"])]
    meshlm("finetune", *common, "--out", str(out), "--from", str(backbone), *sets(extra))
    seconds = time.perf_counter() - started
    evaluated = meshlm("eval", "--run", str(out), "--data", str(files["test"]), "--json")
    return {"scores": json.loads(evaluated.strip().splitlines()[-1]), "train_seconds": seconds}


def lstm_backbone(cache: Path) -> Path:
    """lstm-tiny pretrained on the default corpus with the default backbone's budget (cached)."""
    out = cache / "backbones" / "lstm-192-800"
    if not (out / "model.safetensors").is_file():
        overrides = [*LSTM_PRETRAIN, f'data.cache_dir="{cache}"']
        meshlm("train", "--config", "lstm-tiny", "--out", str(out), "--overwrite", *sets(overrides))
    return out


def untrained_twin(pretrained: Path) -> Path:
    """`pretrained`'s architecture and tokenizer with freshly initialised weights."""
    from meshlm.artifacts.run_dir import load_run_config
    from meshlm.artifacts.weights_file import save_weights
    from meshlm.model.registry import build_model

    out = pretrained.with_name(pretrained.name + "-untrained")
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        cfg = load_run_config(pretrained)
        for name in ("config.toml", "tokenizer.json"):
            (out / name).write_bytes((pretrained / name).read_bytes())
        save_weights(build_model(cfg.model, seed=0).state_dict(), cfg.model, out / "model.safetensors")
    return out


def backbone(name: str, cache: Path) -> Path:
    from meshlm.tasks.default_backbone import default_backbone

    pretrained = default_backbone(cache) if name.startswith("llama") else lstm_backbone(cache)
    return untrained_twin(pretrained) if name.endswith("-untrained") else pretrained


def score_of(scores: dict) -> str:
    if "accuracy" in scores:
        return f"accuracy {scores['accuracy']:.3f} (macro-F1 {scores['macro_f1']:.3f})"
    return f"span F1 {scores['f1']:.3f} (P {scores['precision']:.3f}, R {scores['recall']:.3f})"


def table(results: Path) -> str:
    """The markdown table of results.jsonl (the last row of each task and method wins)."""
    rows = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        rows[(r["task"], r["method"])] = r
    order = {m: i for i, m in enumerate([*NAMES, *BACKBONES])}
    lines = ["| task | method | test score | train s |", "| --- | --- | --- | ---: |"]
    for task in ("classify", "ner", "srl"):
        for (t, method), r in sorted(rows.items(), key=lambda kv: order.get(kv[0][1], 99)):
            if t == task:
                lines.append(f"| {task} | {NAMES.get(method, method)} | {score_of(r['scores'])} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["classify", "ner", "srl"])
    p.add_argument("--methods", nargs="+", default=None, help="baselines and backbones to run (default: all)")
    p.add_argument("--cache", default=".meshlm-cache")
    p.add_argument("--out", default="runs/bench-tasks")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every fine-tuning")
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--table", action="store_true", help="print the table of <out>/results.jsonl and stop")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cache, out = Path(args.cache).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache_set = [f'data.cache_dir="{cache}"']
    if args.table:
        return print(table(out / "results.jsonl"))
    if args.throughput:
        return throughput(cache, out, args.rounds, cache_set)
    for task in args.tasks:
        files = builtin_files(task, cache)
        train, _ = read_examples(files["train"], task)
        test, _ = read_examples(files["test"], task)
        for method in [*METHODS[task], *BACKBONES]:
            if args.methods and method not in args.methods:
                continue
            if method in BACKBONES:
                bb = backbone(method, cache)
                r = finetuned(task, files, out / f"{task}-{method}", bb, cache_set + args.extra)
            else:
                r = run(method, task, train, test)
            row = {"task": task, "method": method, "scores": r["scores"], "train_s": round(r["train_seconds"], 1)}
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(out / "results.jsonl"))


def median_step_time(metrics: Path) -> float:
    """The median training step time of a fine-tuning run (its metrics.jsonl, written by rank 0):
    the step alone, without the start-up, the data encoding and the final evaluation."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows if "step_time_s" in r)


def throughput(cache: Path, out: Path, rounds: int, cache_set: list[str]) -> None:
    """Fine-tuning seconds per step (wall time of the command, and the median step time), 1
    process vs dp2 (global batch 32 either way: dp2 runs 16 per rank); then predict of a classifier at --nproc 1
    vs 2, work time = wall time - the same command's start-up (a one-line input); alternating
    rounds, medians."""
    from meshlm.tasks.default_backbone import default_backbone

    files, bb = builtin_files("classify", cache), default_backbone(cache)
    common = ["--task", "classify", "--train", str(files["train"]), "--valid", str(files["valid"]), "--from", str(bb)]
    steps = 30
    fixed = [*cache_set, "task.epochs=0", f"train.steps={steps}", "train.eval_every=1000", "train.progress=false"]
    times, step_s = {1: [], 2: []}, {1: [], 2: []}
    for r in range(rounds):
        for n in (1, 2):
            started = time.perf_counter()
            layout = ["--nproc", "2", "--set", "parallel.dp=2"] if n == 2 else []
            meshlm("finetune", *common, "--out", str(out / f"tp-{n}"), *layout, *sets(fixed))
            times[n].append(time.perf_counter() - started)
            step_s[n].append(median_step_time(out / f"tp-{n}" / "metrics.jsonl"))
            print(
                f"round {r + 1}: finetune {steps} steps, {n} process(es): {times[n][-1]:.1f} s wall, "
                f"median step {step_s[n][-1]:.3f} s",
                flush=True,
            )
    one, two = statistics.median(times[1]), statistics.median(times[2])
    step_one, step_two = statistics.median(step_s[1]), statistics.median(step_s[2])
    summary = {"finetune_steps": steps, "one_process_wall_s": one, "dp2_wall_s": two, "speedup_wall": one / two}
    summary |= {"one_process_step_s": step_one, "dp2_step_s": step_two, "speedup_step": step_one / step_two}
    print(json.dumps(summary), flush=True)

    # predict: the 1-process model above, the test texts three times over (1152 lines).
    run_dir = out / "tp-1"
    texts = [json.loads(line)["text"] for line in files["test"].read_text().splitlines()]
    inputs = {"work": out / "predict-in.jsonl", "startup": out / "predict-startup.jsonl"}
    inputs["work"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 3))
    inputs["startup"].write_text(json.dumps({"text": texts[0]}) + "\n")
    walls: dict[tuple, list[float]] = {}
    answers = {}
    for r in range(rounds):
        for n in (1, 2):
            for name, path in inputs.items():
                target = out / f"predict-out-{n}-{name}.jsonl"
                started = time.perf_counter()
                nproc = ["--nproc", "2"] if n == 2 else []
                meshlm(
                    "predict",
                    "--run",
                    str(run_dir),
                    "--input",
                    str(path),
                    "--output",
                    str(target),
                    "--overwrite",
                    *nproc,
                )
                walls.setdefault((n, name), []).append(time.perf_counter() - started)
                answers[(n, name)] = target.read_text()
                print(f"round {r + 1}: predict {name}, --nproc {n}: {walls[(n, name)][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    work = {n: med[(n, "work")] - med[(n, "startup")] for n in (1, 2)}
    lines = len(texts) * 3
    print(
        json.dumps(
            {
                "predict_lines": lines,
                "wall_s": {n: med[(n, "work")] for n in (1, 2)},
                "startup_s": {n: med[(n, "startup")] for n in (1, 2)},
                "work_s": work,
                "lines_per_s": {n: lines / work[n] for n in (1, 2)},
                "speedup_work": work[1] / work[2],
                "speedup_wall": med[(1, "work")] / med[(2, "work")],
                "same_output": answers[(1, "work")] == answers[(2, "work")],
            }
        )
    )


if __name__ == "__main__":
    main()
