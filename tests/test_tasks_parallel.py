"""Fine-tuning a classification head and a tagging head (CRF) under dp2 (zero 0 and 3), tp2
and pp2 equals one process: 5 AdamW steps, every loss within 1e-5 relative, the validation
scores equal, every parameter within 1e-4 (float32, gloo, forked ranks)."""

from __future__ import annotations

import math

import pytest
from task_fixtures import classify_records, make_backbone, ner_records, write_jsonl

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
TASKS = {
    "classify": ("classify", classify_records, []),
    "ner-crf": ("ner", ner_records, ["task.crf=true"]),
    "srl": ("srl", lambda n, seed: ner_records(n, seed, predicate=True), []),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks-parallel")
    backbone = make_backbone(root / "backbone")
    files = {}
    for name, (_, records, _) in TASKS.items():
        files[name] = (
            write_jsonl(root / f"{name}-train.jsonl", records(40, 1)),
            write_jsonl(root / f"{name}-valid.jsonl", records(13, 2)),
        )
    return backbone, files


def _run(rank, cfg, train, valid, out):
    result = finetune(cfg, train, valid, out, log=lambda *a, **k: None)
    return result.losses, result.best


def _weights(out):
    cfg = load_task_config(out / "config.toml")
    return load_weights(out / "model.safetensors", task_model_config(cfg)).state_dict()


_refs: dict = {}


def _reference(name, setup, tmp_path_factory):
    if name not in _refs:
        backbone, files = setup
        task, _, extra = TASKS[name]
        out = tmp_path_factory.mktemp(f"ref-{name}")
        cfg = finetune_config(task, files[name][0], backbone, BASE + extra)
        result = finetune(cfg, *files[name], out, log=lambda *a, **k: None)
        _refs[name] = (result.losses, result.best, _weights(out))
    return _refs[name]


@pytest.mark.parametrize("case, world, overrides", LAYOUTS, ids=[c for c, _, _ in LAYOUTS])
@pytest.mark.parametrize("name", ["classify", "ner-crf"])
def test_finetuning_matches_single_process(name, case, world, overrides, setup, tmp_path, tmp_path_factory):
    ref_losses, ref_best, ref_state = _reference(name, setup, tmp_path_factory)
    backbone, files = setup
    task, _, extra = TASKS[name]
    cfg = finetune_config(task, files[name][0], backbone, BASE + extra + overrides, world_size=world)
    results = run_distributed(_run, world, cfg, *files[name], tmp_path / "run")
    losses, best = results[0]
    assert all(r == results[0] for r in results[1:]), "every rank reports the same losses and scores"
    assert len(losses) == len(ref_losses) == 5
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"step {step}: loss {a} vs single process {b}"
    assert math.isclose(best["loss"], ref_best["loss"], rel_tol=LOSS_RTOL)
    assert best["score"] == ref_best["score"]
    state = _weights(tmp_path / "run")
    assert set(state) == set(ref_state)
    for key, value in ref_state.items():
        diff = (state[key] - value).abs().max().item()
        assert diff <= PARAM_ATOL, f"{key}: max abs difference {diff}"


def test_srl_predicate_input_under_pipeline_matches_single_process(setup, tmp_path, tmp_path_factory):
    """The predicate indicator is a first-stage input: pp2 carries it exactly."""
    ref_losses, ref_best, _ = _reference("srl", setup, tmp_path_factory)
    backbone, files = setup
    cfg = finetune_config("srl", files["srl"][0], backbone, BASE + LAYOUTS[3][2], world_size=2)
    losses, best = run_distributed(_run, 2, cfg, *files["srl"], tmp_path / "run")[0]
    for a, b in zip(losses, ref_losses):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL)
    assert best["score"] == ref_best["score"]
