"""Fine-tuning a classification head (with hashed n-gram embeddings) and tagging heads under dp2
(zero 0 and 3), tp2 and pp2 equals one process: 5 AdamW steps, every loss within 1e-5 relative,
the validation scores equal, every parameter within 1e-4 (float32, gloo, forked ranks). The
tagging world fine-tunes, one after the other, a CRF tagger on a causal llama, a tagger on a
non-causal llama (model.causal=false) and one on a bidirectional LSTM (model.bidirectional=true):
one spawned world per layout and group."""

from __future__ import annotations

import math

import pytest
from task_fixtures import TINY_LSTM, classify_records, make_backbone, ner_records, write_jsonl

from meshlm.artifacts.weights_file import load_weights
from meshlm.distributed.spawn import run_distributed
from meshlm.tasks.config import load_task_config
from meshlm.tasks.finetune import finetune, finetune_config
from meshlm.tasks.spec import task_model_config

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4
BASE = [
    "task.epochs=0",
    "train.steps=5",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=0.01",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",
    "train.eval_every=5",
    "train.progress=false",
    "task.dropout=0.0",
]
LAYOUTS = [
    ("dp2-zero0", 2, ["parallel.dp=2", "parallel.zero=0"]),
    ("dp2-zero3", 2, ["parallel.dp=2", "parallel.zero=3"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2", 2, ["parallel.pp=2", 'parallel.pp_schedule="1f1b"']),
]
RECORDS = {
    "classify": classify_records,
    "ner": ner_records,
    "srl": lambda n, seed: ner_records(n, seed, predicate=True),
}
# case -> (task, backbone, overrides)
CASES = {
    "classify": ("classify", "llama", ["task.ngram_buckets=4096"]),
    "ner-crf": ("ner", "llama", ["task.crf=true", "model.causal=true"]),
    "ner-llama-noncausal": ("ner", "llama", ["model.causal=false"]),
    "ner-lstm-bidirectional": ("ner", "lstm", ["model.bidirectional=true"]),
    "srl": ("srl", "llama", ["task.ngram_buckets=4096"]),
}
# The cases one spawned world fine-tunes in turn (spawning a world costs more than a case).
WORLDS = {"classify": ["classify"], "tagging": ["ner-crf", "ner-llama-noncausal", "ner-lstm-bidirectional"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks-parallel")
    backbones = {"llama": make_backbone(root / "llama"), "lstm": make_backbone(root / "lstm", TINY_LSTM)}
    files = {}
    for task, records in RECORDS.items():
        files[task] = (
            write_jsonl(root / f"{task}-train.jsonl", records(40, 1)),
            write_jsonl(root / f"{task}-valid.jsonl", records(13, 2)),
        )
    return backbones, files


def _config(name, setup, overrides=(), world_size=1):
    backbones, files = setup
    task, backbone, extra = CASES[name]
    return finetune_config(task, files[task][0], backbones[backbone], BASE + extra + list(overrides), world_size)


def _run(rank, jobs):
    """Each (cfg, train, valid, out) fine-tuned in turn on this rank: [(losses, best), ...]."""
    results = []
    for cfg, train, valid, out in jobs:
        result = finetune(cfg, train, valid, out, log=lambda *a, **k: None)
        results.append((result.losses, result.best))
    return results


def _weights(out):
    cfg = load_task_config(out / "config.toml")
    return load_weights(out / "model.safetensors", task_model_config(cfg)).state_dict()


_refs: dict = {}


def _reference(name, setup, tmp_path_factory):
    if name not in _refs:
        files = setup[1][CASES[name][0]]
        out = tmp_path_factory.mktemp(f"ref-{name}")
        result = finetune(_config(name, setup), *files, out, log=lambda *a, **k: None)
        _refs[name] = (result.losses, result.best, _weights(out))
    return _refs[name]


@pytest.mark.parametrize("case, world, overrides", LAYOUTS, ids=[c for c, _, _ in LAYOUTS])
@pytest.mark.parametrize("group", list(WORLDS))
def test_finetuning_matches_single_process(group, case, world, overrides, setup, tmp_path, tmp_path_factory):
    files = setup[1]
    names = WORLDS[group]
    jobs = [(_config(name, setup, overrides, world), *files[CASES[name][0]], tmp_path / name) for name in names]
    results = run_distributed(_run, world, jobs)
    assert all(r == results[0] for r in results[1:]), "every rank reports the same losses and scores"
    for name, (losses, best) in zip(names, results[0]):
        ref_losses, ref_best, ref_state = _reference(name, setup, tmp_path_factory)
        assert len(losses) == len(ref_losses) == 5, name
        for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
            assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"{name} step {step}: loss {a} vs single process {b}"
        assert math.isclose(best["loss"], ref_best["loss"], rel_tol=LOSS_RTOL), name
        assert best["score"] == ref_best["score"], name
        state = _weights(tmp_path / name)
        assert set(state) == set(ref_state), name
        for key, value in ref_state.items():
            diff = (state[key] - value).abs().max().item()
            assert diff <= PARAM_ATOL, f"{name} {key}: max abs difference {diff}"


def test_srl_predicate_input_under_pipeline_matches_single_process(setup, tmp_path, tmp_path_factory):
    """The predicate indicator is a first-stage input, and the n-grams' vectors ride from the first
    stage to the last as extra channels: pp2 carries both exactly."""
    ref_losses, ref_best, _ = _reference("srl", setup, tmp_path_factory)
    cfg = _config("srl", setup, LAYOUTS[3][2], world_size=2)
    ((losses, best),) = run_distributed(_run, 2, [(cfg, *setup[1]["srl"], tmp_path / "run")])[0]
    for a, b in zip(losses, ref_losses):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL)
    assert best["score"] == ref_best["score"]
