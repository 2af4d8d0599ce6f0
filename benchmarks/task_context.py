"""Taggers with and without right context: span F1 on the test split of the built-in ner and srl
datasets and fine-tuning time, causal vs bidirectional, on a llama backbone (model.causal) and
an LSTM backbone (model.bidirectional). Results: docs/benchmarks.md ("Tasks: causal vs
bidirectional context").

    OMP_NUM_THREADS=1 python benchmarks/task_context.py [--cache .meshlm-cache] [--train-examples 2000]
        [--epochs 2] [--lstm-steps 300] [--rounds 1] [--backbones llama lstm] [--set train.lr=1e-2 ...]

Backbones: the default backbone (tiny-cpu llama pretrained 800 steps on the Python standard
library, built once and cached) and lstm-tiny pretrained --lstm-steps steps on the same corpus
(cached likewise). Every fine-tuning run has the same seed, data and steps; only the context
option differs. The machine is shared and noisy: the two variants of a pair run one after the
other, alternating which goes first each round, and the time is the median over rounds (F1 is
the same every round: same seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from meshlm.config import load_config
from meshlm.tasks.datasets import builtin_files
from meshlm.tasks.evaluate import evaluate_file
from meshlm.tasks.finetune import finetune, finetune_config
from meshlm.tasks.predict import load_task_model

# backbone -> (the causal setting, the right-context setting)
VARIANTS = {
    "llama": ("model.causal=true", "model.causal=false"),
    "lstm": ("model.bidirectional=false", "model.bidirectional=true"),
}


def quiet(*args, **kwargs) -> None:
    pass


def lstm_backbone(cache: Path, steps: int) -> Path:
    """lstm-tiny pretrained `steps` steps on the default corpus, trained once into the cache."""
    from meshlm.train.trainer import train

    out = cache / "backbones" / f"lstm-tiny-{steps}"
    if (out / "model.safetensors").is_file():
        return out
    cfg = load_config(
        "lstm-tiny",
        [
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            "train.sample_tokens=0",
            "train.checkpoint_every=0",
            "train.progress=false",
            f'data.cache_dir="{cache}"',
        ],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    started = time.perf_counter()
    result = train(cfg, staging, overwrite=True, log=quiet)
    print(
        f"# pretrained lstm-tiny {steps} steps in {time.perf_counter() - started:.0f} s, "
        f"validation loss {result.final_val_loss}",
        file=sys.stderr,
        flush=True,
    )
    staging.rename(out)
    return out


def subsample(path: Path, n: int, out: Path) -> Path:
    """n examples of a JSONL split, evenly spaced (the built-in splits are in a content-hash
    order), plus the first example of each tag the sample lacks (0: the whole split)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if n:
        chosen = lines[:: max(1, len(lines) // n)][:n]
        seen = {t for line in chosen for t in json.loads(line)["tags"]}
        for line in lines:
            if not seen.issuperset(json.loads(line)["tags"]):
                chosen.append(line)
                seen.update(json.loads(line)["tags"])
        lines = chosen
    out.write_text("".join(lines), encoding="utf-8")
    return out


def run_one(task: str, files: dict, train: Path, backbone: Path, sets: list[str], out: Path) -> dict:
    cfg = finetune_config(task, train, backbone, sets)
    result = finetune(cfg, train, files["valid"], out, log=quiet)
    scores = evaluate_file(load_task_model(out), files["test"])
    return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"], "s": result.seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["ner", "srl"])
    p.add_argument("--backbones", nargs="+", default=list(VARIANTS))
    p.add_argument("--cache", default=".meshlm-cache")
    p.add_argument("--out", default="runs/bench-task-context")
    p.add_argument("--train-examples", type=int, default=2000, help="first N of the training split (0: all)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lstm-steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", dest="extra", action="append", default=[], help="more overrides, e.g. train.lr=1e-2")
    args = p.parse_args()
    cache, out = Path(args.cache).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbones = {}
    if "llama" in args.backbones:
        from meshlm.tasks.default_backbone import default_backbone

        backbones["llama"] = default_backbone(cache, log=quiet)
    if "lstm" in args.backbones:
        backbones["lstm"] = lstm_backbone(cache, args.lstm_steps)
    common = [f'data.cache_dir="{cache}"', f"task.epochs={args.epochs}", "train.progress=false", *args.extra]
    for task in args.tasks:
        files = builtin_files(task, cache)
        train = subsample(files["train"], args.train_examples, out / f"{task}-train.jsonl")
        for name, backbone in backbones.items():
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS[name]}
            for r in range(args.rounds):
                order = VARIANTS[name] if r % 2 == 0 else VARIANTS[name][::-1]
                for variant in order:
                    runs[variant].append(
                        run_one(task, files, train, backbone, common + [variant], out / f"{task}-{name}-{variant}")
                    )
            causal, right = (runs[v] for v in VARIANTS[name])
            row = {"task": task, "backbone": name}
            for label, results in (("causal", causal), ("right", right)):
                row[f"{label}_f1"] = round(results[0]["f1"], 4)
                row[f"{label}_p"], row[f"{label}_r"] = round(results[0]["precision"], 4), round(results[0]["recall"], 4)
                row[f"{label}_s"] = round(statistics.median(x["s"] for x in results), 1)
            row["time_ratio"] = round(row["right_s"] / row["causal_s"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
