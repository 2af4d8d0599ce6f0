"""Single-process training end to end: loss falls, run directory contents, CLI train -> generate,
and the errors that must stop a run before any work."""

import json
import math
import subprocess
import sys

import pytest

from meshlm.config import ConfigError, load_config
from meshlm.inference.simple_generate import end_of_run_sample
from meshlm.train.metrics import read_metrics
from meshlm.train.optim import lr_at
from meshlm.train.trainer import train

TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=600000",
    "train.micro_batch=8",
    "train.global_batch=16",
    "train.steps=90",
    "train.warmup_steps=5",
    "train.eval_every=30",
    "train.eval_batches=4",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.sample_tokens=8",
    "train.progress=false",
]


def tiny_overrides(tmp_path, *extra):
    return TINY + [f'data.cache_dir="{tmp_path / "cache"}"', *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(None, tiny_overrides(tmp))
    result = train(cfg, tmp / "run", log=lambda *a, **k: None, sampler=end_of_run_sample)
    return tmp, cfg, result


def test_loss_falls_and_run_directory_is_complete(trained_run):
    tmp, cfg, result = trained_run
    run = tmp / "run"
    for name in ("config.toml", "metrics.jsonl", "loss.png", "model.safetensors", "tokenizer.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, cfg.train.steps + 1))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in evals] == [30, 60, 90]
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert first > math.log(cfg.model.vocab_size) - 0.5
    assert last < first - 1.0, (first, last)
    assert evals[-1]["val_loss"] < first - 1.0
    assert result.sample.startswith(cfg.train.sample_prompt)


def test_accumulation_equals_one_large_batch(tmp_path):
    """global_batch 16 as 2 x micro-batch 8 trains the same model as micro-batch 16."""
    base = tiny_overrides(tmp_path, "train.steps=3", "train.eval_every=0")
    train(load_config(None, base), tmp_path / "a", log=lambda *a, **k: None)
    train(load_config(None, base + ["train.micro_batch=16"]), tmp_path / "b", log=lambda *a, **k: None)
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]).train
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_existing_different_run_is_refused_before_work(trained_run):
    tmp, _, _ = trained_run
    cfg = load_config(None, tiny_overrides(tmp, "model.d_model=32"))
    with pytest.raises(ConfigError, match="already holds a different run"):
        train(cfg, tmp / "run", log=lambda *a, **k: None)


def test_missing_corpus_is_one_clear_error(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, f'data.source="{tmp_path / "nope"}"'))
    with pytest.raises(ConfigError, match="nope"):
        train(cfg, tmp_path / "run", log=lambda *a, **k: None)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True, check=check)


@pytest.mark.slow
def test_cli_train_then_generate(tmp_path):
    sets = [x for o in tiny_overrides(tmp_path, "train.steps=8", "train.eval_every=4") for x in ("--set", o)]
    run = tmp_path / "cli-run"
    _cli("train", *sets, "--out", str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in records) == 8 and sum("val_loss" in r for r in records) == 2
    greedy = [
        _cli("generate", "--run", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12").stdout
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0].startswith("def ") and len(greedy[0]) > len("def \n")
    sampled = _cli(
        "generate",
        "--run",
        str(run),
        "--prompt",
        "import",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
    ).stdout
    assert sampled.startswith("import")
    # a second run into the same directory with another config is refused, unless --overwrite
    proc = _cli("train", *sets, "--set", "model.d_model=32", "--out", str(run), check=False)
    assert proc.returncode != 0 and "already holds a different run" in proc.stderr and "--overwrite" in proc.stderr


def test_cli_reports_missing_corpus_and_empty_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for source in (tmp_path / "missing", empty):
        proc = _cli(
            "train",
            "--set",
            f'data.source="{source}"',
            "--set",
            f'data.cache_dir="{tmp_path}"',
            "--out",
            str(tmp_path / "r"),
            check=False,
        )
        assert proc.returncode != 0 and str(source) in proc.stderr and "Traceback" not in proc.stderr


def test_generate_on_a_directory_that_is_not_a_run(tmp_path):
    proc = _cli("generate", "--run", str(tmp_path), "--prompt", "x", check=False)
    assert proc.returncode != 0 and "not a meshlm run directory" in proc.stderr


def test_activation_checkpointing_and_bf16_autocast(tmp_path):
    """Recomputing activations changes nothing (same losses); bf16 autocast trains close to float32."""
    base = tiny_overrides(tmp_path, "train.steps=4", "train.eval_every=0")
    runs = {}
    for name, extra in {
        "plain": [],
        "ac": ["train.activation_checkpointing=true"],
        "bf16": ["train.dtype=bfloat16"],
    }.items():
        train(load_config(None, base + extra), tmp_path / name, log=lambda *a, **k: None)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert runs["ac"] == pytest.approx(runs["plain"], rel=1e-6)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2)
    assert runs["bf16"] != runs["plain"]  # autocast really ran in bfloat16
