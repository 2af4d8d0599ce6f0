"""Small task data and a tiny backbone run directory, made in a second or two, for the task
tests: a tokenizer trained on a few sentences, a freshly initialised tiny model, and random
classification / NER / SRL examples whose labels follow simple rules (so training can learn)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from meshlm.artifacts.weights_file import save_weights
from meshlm.config import load_config
from meshlm.data.tokenizer import train_tokenizer
from meshlm.model.registry import build_model

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "in", "park", "with", "John", "Smith", "Paris"]
TINY_LLAMA = [
    'model.family="transformer"',
    "model.vocab_size=300",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_seq_len=64",
    "data.seq_len=32",
]
TINY_LSTM = [
    'model.family="lstm"',
    "model.vocab_size=300",
    "model.d_embed=16",
    "model.d_hidden=24",
    "model.n_layers=2",
    "model.max_seq_len=64",
    "data.seq_len=32",
]


def make_backbone(path: Path, overrides: list[str] = TINY_LLAMA) -> Path:
    """A run directory (config.toml, tokenizer.json, model.safetensors) of an untrained tiny model."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, overrides)
    texts = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(200)]
    train_tokenizer(texts, cfg.model.vocab_size, path / "tokenizer.json")
    save_weights(build_model(cfg.model, seed=0).state_dict(), cfg.model, path / "model.safetensors")
    (path / "config.toml").write_text(cfg.to_toml())
    return path


def classify_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        label = rnd.choice(["animal", "place", "person"])
        pool = {"animal": ["cat", "dog", "mat"], "place": ["Paris", "park"], "person": ["John", "Smith"]}[label]
        words = [rnd.choice(pool + ["the", "a", "in", "on"]) for _ in range(rnd.randint(3, 9))]
        out.append({"text": " ".join(words), "label": label})
    return out


def ner_records(n: int, seed: int = 0, predicate: bool = False) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rnd.randint(2, 6)):
            r = rnd.random()
            if r < 0.25:
                tokens += ["John", "Smith"]
                tags += ["B-PER", "I-PER"]
            elif r < 0.45:
                tokens += ["Paris"]
                tags += ["B-LOC"]
            else:
                tokens.append(rnd.choice(["the", "cat", "sat", "in", "ran"]))
                tags.append("O")
        record = {"tokens": tokens, "tags": tags}
        if predicate:
            record["predicate"] = rnd.randrange(len(tokens))
        out.append(record)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def classify_setup(root: Path, n_train: int = 48, n_valid: int = 16) -> Path:
    """root/bb (a tiny untrained backbone), root/train.jsonl and root/valid.jsonl (classification)."""
    make_backbone(root / "bb")
    write_jsonl(root / "train.jsonl", classify_records(n_train, 1))
    write_jsonl(root / "valid.jsonl", classify_records(n_valid, 2))
    return root


def meshlm(*args, cwd, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m meshlm ARGS` in `cwd` with one thread; with `check`, it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc
