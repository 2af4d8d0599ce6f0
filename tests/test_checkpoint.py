"""Distributed checkpoints: exact resume in the same and in other layouts, data order, verification
of the manifest, surviving a killed worker or a killed save, export (float32, gloo, CPU).

A source run trains 6 steps and checkpoints at step 3 (and 6); a second run resumes from step 3,
possibly under another layout and world size, and must log the source's losses for steps 4-6:
within 1e-6 relative in the same layout, 1e-5 across layouts (the parity tolerance of
test_parallel_training.py), with final weights within 1e-4.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import kill_worker
from training_runs import final_weights, quiet, run_training

from meshlm.config import ConfigError, load_config
from meshlm.distributed.env import read_launch_env
from meshlm.train.checkpoint import CheckpointError, export_checkpoint, find_resume_checkpoint, verify_checkpoint
from meshlm.train.checkpoint_manifest import list_checkpoints, step_dir
from meshlm.train.checkpoint_state import range_boxes
from meshlm.train.metrics import read_metrics
from meshlm.train.trainer import train

SAME_RTOL, CROSS_RTOL, PARAM_ATOL = 1e-6, 1e-5, 1e-4

VARIANTS = {
    "llama": ['model.arch="llama"', "model.n_heads=8", "model.n_kv_heads=4", "model.tie_embeddings=false"],
    "gpt2": ['model.arch="gpt2"', "model.n_heads=4", "model.n_kv_heads=0"],  # tied embeddings, biases
    # gated CNN (d_model and n_layers from BASE): conv weights split over channels, a replicated
    # bottleneck projection, tied embeddings
    "gcnn": ['model.family="gcnn"', "model.bottleneck=32", "model.channels=48", "model.tie_embeddings=true"],
    # tied output behind a projection; only the vocabulary splits under tp
    "lstm": ['model.family="lstm"', "model.d_embed=32", "model.d_hidden=48", "model.n_layers=4"],
}
BASE = [
    "model.d_model=64",
    "model.n_layers=4",
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=300000",
    "train.steps=6",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "train.progress=false",
    "train.checkpoint_every=3",
]


@pytest.fixture(scope="module")
def data_cache(prepare_corpus):
    return prepare_corpus(BASE)


def _config(variant, cache, extra=()):
    return load_config(None, BASE + VARIANTS[variant] + [f'data.cache_dir="{cache}"'] + list(extra))


def assert_resumed(source, resumed, rtol, cfg, source_dir, resumed_dir):
    (src_losses, src_val), (losses, val) = source, resumed
    assert len(losses) == 3
    for step, (a, b) in enumerate(zip(losses, src_losses[3:]), start=4):
        assert math.isclose(a, b, rel_tol=rtol), f"step {step}: resumed loss {a} vs uninterrupted {b}"
    assert math.isclose(val, src_val, rel_tol=rtol), f"val loss {val} vs {src_val}"
    want, got = final_weights(source_dir, cfg), final_weights(resumed_dir, cfg)
    for name, value in want.items():
        diff = (got[name] - value).abs().max().item()
        assert diff <= PARAM_ATOL, f"{name}: max abs difference {diff}"


# ----------------------------------------------------------------------------- resume


def test_same_layout_resume_is_exact_with_async_saves_and_retention(data_cache, tmp_path):
    """ZeRO-2 over dp2 (optimizer shards that cut through parameters), async saves every step,
    keep the last 4; resume from step 3 in the same layout."""
    layout = [
        "parallel.dp=2",
        "parallel.zero=2",
        "train.async_checkpoint=true",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=4",
    ]
    cfg = _config("llama", data_cache, layout)
    source = run_training(2, cfg, tmp_path / "a")
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [3, 4, 5, 6]
    assert not list((tmp_path / "a" / "checkpoints").glob("*.tmp"))
    resumed = run_training(2, cfg, tmp_path / "b", resume=str(step_dir(tmp_path / "a", 3)))
    assert_resumed(source, resumed, SAME_RTOL, cfg, tmp_path / "a", tmp_path / "b")


CROSS = [
    # (id, variant, source world, source layout, target world, target layout)
    ("dp2xtp2-to-pp2", "llama", 4, ["parallel.dp=2", "parallel.tp=2"], 2, ["parallel.pp=2"]),
    ("zero3-dp4-to-single", "gpt2", 4, ["parallel.dp=4", "parallel.zero=3"], 1, []),
    ("single-to-dp2xtp2xpp2", "gpt2", 1, [], 8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"]),
    # ZeRO ranges and padded vocabulary slices (301 rows over tp2) into FSDP2 chunks of tp slices
    (
        "zero2xtp2-to-zero3xtp2-sp",
        "gpt2",
        4,
        ["parallel.dp=2", "parallel.zero=2", "parallel.tp=2"],
        4,
        ["parallel.dp=2", "parallel.zero=3", "parallel.tp=2", "parallel.sequence_parallel=true"],
    ),
    # gcnn: column-parallel convolutions (3-D weights) under tp + sequence parallel, into FSDP2
    # and a pipeline cut with the tied copies on two ranks
    (
        "gcnn-tp2-sp-to-zero3xpp2",
        "gcnn",
        2,
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        4,
        ["parallel.dp=2", "parallel.zero=3", "parallel.pp=2"],
    ),
    # the LSTM: vocabulary slices and ZeRO-2 ranges into FSDP2 chunks of whole LSTM layers over a
    # pipeline whose last stage holds the projection and the tied output copy
    (
        "lstm-zero2xtp2-to-zero3xpp2",
        "lstm",
        4,
        ["parallel.dp=2", "parallel.zero=2", "parallel.tp=2"],
        4,
        ["parallel.dp=2", "parallel.zero=3", "parallel.pp=2"],
    ),
    # tied embedding copies on one rank (zbv) loading from one key, ZeRO-1 under pp
    (
        "tp4-to-zero1xzbv",
        "gpt2",
        4,
        ["parallel.tp=4"],
        4,
        [
            "parallel.dp=2",
            "parallel.zero=1",
            "parallel.pp=2",
            'parallel.pp_schedule="zbv"',
            "parallel.pp_virtual_stages=2",
        ],
    ),
]


@pytest.mark.parametrize(
    "case, variant, src_world, src_layout, dst_world, dst_layout", CROSS, ids=[c[0] for c in CROSS]
)
def test_resume_across_layouts(case, variant, src_world, src_layout, dst_world, dst_layout, data_cache, tmp_path):
    src_cfg = _config(variant, data_cache, src_layout)
    source = run_training(src_world, src_cfg, tmp_path / "a")
    manifest = verify_checkpoint(step_dir(tmp_path / "a", 3))
    assert manifest["world_size"] == src_world and manifest["step"] == 3
    dst_cfg = _config(variant, data_cache, dst_layout)
    resumed = run_training(dst_world, dst_cfg, tmp_path / "b", resume=str(step_dir(tmp_path / "a", 3)))
    assert_resumed(source, resumed, CROSS_RTOL, dst_cfg, tmp_path / "a", tmp_path / "b")


def test_data_order_and_metrics_identical_after_resume(data_cache, tmp_path, monkeypatch):
    """Every resumed step draws exactly the batch the uninterrupted run drew, and no other."""
    from meshlm.train.step import StepRunner

    drawn: list[tuple[int, list[int], torch.Tensor]] = []
    original = StepRunner._batch

    def recording(self, step, ids):
        x, y = original(self, step, ids)
        drawn.append((step, list(ids), x.clone()))
        return x, y

    monkeypatch.setattr(StepRunner, "_batch", recording)
    cfg = _config("llama", data_cache, ["train.micro_batch=4"])  # 2 micro-batches per step
    run = tmp_path / "run"
    first = train(cfg, run, log=quiet).losses
    uninterrupted = drawn[:]
    drawn.clear()
    shutil.rmtree(step_dir(run, 6))  # as if the run had died after step 5
    resumed = train(cfg, run, log=quiet, resume="auto").losses
    assert [s for s, _, _ in drawn] == [3, 3, 4, 4, 5, 5]
    for (s, ids, x), (s0, ids0, x0) in zip(drawn, uninterrupted[6:]):
        assert (s, ids) == (s0, ids0) and torch.equal(x, x0), f"step {s + 1} drew a different batch"
    assert resumed == first[3:]
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps 4-6 logged once, by the resumed run
    assert [r["loss"] for r in records] == first


def test_resume_auto_without_checkpoint_starts_fresh_and_conflicts_fail(data_cache, tmp_path):
    cfg = _config("gpt2", data_cache, ["train.steps=2", "train.checkpoint_every=0"])
    assert len(train(cfg, tmp_path / "fresh", log=quiet, resume="auto").losses) == 2
    assert not (tmp_path / "fresh" / "checkpoints").exists()
    ckpt_cfg = _config("gpt2", data_cache, ["train.steps=2", "train.checkpoint_every=1"])
    train(ckpt_cfg, tmp_path / "done", log=quiet)
    result = train(ckpt_cfg, tmp_path / "next", log=quiet, resume=str(tmp_path / "done"))  # a run: its newest
    assert result.losses == [] and (tmp_path / "next" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="pass only one of them"):
        train(cfg, tmp_path / "fresh", log=quiet, resume="auto", overwrite=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, tmp_path / "other", log=quiet, resume=str(tmp_path / "nowhere" / "step-000001"))


# ----------------------------------------------------------------------------- verification


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one bit in the middle
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("truncate", "truncated"), ("flip", "sha256")])
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_damaged_checkpoint_is_refused_and_auto_falls_back(victim, how, message, data_cache, tmp_path):
    cfg = _config("gpt2", data_cache)
    run = tmp_path / "run"
    first = train(cfg, run, log=quiet).losses
    newest = step_dir(run, 6)
    _damage(newest / victim, how)
    with pytest.raises(CheckpointError, match=f"{victim}.*{message}"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match=f"{victim}.*{message}"):
        train(cfg, tmp_path / "other", log=quiet, resume=str(newest))
    logged = []
    point = find_resume_checkpoint("auto", run, read_launch_env(), log=logged.append)
    assert point.step == 3 and victim in logged[0]
    resumed = train(cfg, run, log=quiet, resume="auto").losses
    assert resumed == first[3:]


def test_incomplete_checkpoints_are_never_loaded(data_cache, tmp_path):
    cfg = _config("gpt2", data_cache)
    run = tmp_path / "run"
    train(cfg, run, log=quiet)
    (step_dir(run, 6) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(step_dir(run, 6))
    partial = step_dir(run, 9).with_name("step-000009.tmp")
    shutil.copytree(step_dir(run, 3), partial)
    with pytest.raises(CheckpointError, match="still being written"):
        verify_checkpoint(partial)
    assert find_resume_checkpoint("auto", run, read_launch_env(), log=quiet).step == 3


# ----------------------------------------------------------------------------- faults (subprocesses)


def _cli_command(cache, out, overrides, *extra, driver=()):
    sets = [x for o in BASE + VARIANTS["llama"] + [f'data.cache_dir="{cache}"'] + overrides for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, *driver] if driver else [sys.executable, "-m", "meshlm"]
    return [*command, "train", *sets, "--out", str(out), *extra], env


def _logged_losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _wait_for_step(run, step, proc, timeout=120.0):
    """Poll metrics.jsonl until training step `step` is logged (the harness watches the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        try:
            if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(run / "metrics.jsonl")):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"step {step} was not reached within {timeout} s")


def test_sigkilled_worker_restarts_resumes_and_matches_uninterrupted(data_cache, tmp_path):
    """`meshlm train --nproc 2 --max-restarts 1`; the test SIGKILLs worker 1 once step 3 is logged
    (after the step-2 checkpoint); the agent restarts both workers, which resume from the newest
    complete checkpoint and finish with the uninterrupted run's losses."""
    layout = ["parallel.dp=2", "parallel.zero=1", "train.checkpoint_every=2", "train.steps=16"]
    reference, _ = run_training(2, _config("llama", data_cache, layout), tmp_path / "reference")
    run = tmp_path / "run"
    argv, env = _cli_command(data_cache, run, layout, "--nproc", "2", "--max-restarts", "1")
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _wait_for_step(run, 3, proc)
            kill_worker(proc.pid, rank=1)
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    # the loss was seen: the agent reports the killed worker, or its peer (which notices first
    # when its collective breaks) names the dead worker before the agent restarts both
    assert "exitcode: -9" in err or "lost its connection to another worker" in err, err[-4000:]
    assert "resumed from" in out
    losses = _logged_losses(run)
    assert len(losses) == 16
    for step, (a, b) in enumerate(zip(losses, reference), start=1):
        assert math.isclose(a, b, rel_tol=SAME_RTOL), f"step {step}: {a} vs uninterrupted {b}"


def test_kill_during_save_leaves_previous_checkpoint_usable(data_cache, tmp_path):
    """The process dies after the checkpoint data of step 4 is written and before its manifest."""
    layout = ["train.checkpoint_every=2"]
    cfg = _config("llama", data_cache, layout)
    reference = train(cfg, tmp_path / "reference", log=quiet).losses
    run = tmp_path / "run"
    driver = (str(Path(__file__).parent / "drivers" / "kill_after_checkpoint_data.py"), "4")
    argv, env = _cli_command(data_cache, run, layout, driver=driver)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [2]
    partial = run / "checkpoints" / "step-000004.tmp"
    assert partial.is_dir() and any(partial.glob("*.distcp")) and not (partial / "manifest.json").exists()
    verify_checkpoint(step_dir(run, 2))
    resumed = train(cfg, run, log=quiet, resume="auto").losses
    assert len(resumed) == 4
    for step, (a, b) in enumerate(zip(resumed, reference[2:]), start=3):
        assert math.isclose(a, b, rel_tol=SAME_RTOL), f"step {step}: {a} vs uninterrupted {b}"
    assert not partial.exists(), "the next save removes the interrupted one"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]


# ----------------------------------------------------------------------------- export and boxes


def test_export_consolidates_a_sharded_checkpoint(data_cache, tmp_path):
    from meshlm.cli import main
    from meshlm.inference.loading import find_model_files, load_model

    cfg = _config("gpt2", data_cache, ["parallel.tp=2", "parallel.pp=2"])
    run_training(4, cfg, tmp_path / "run")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "final")]) == 0
    final, trained = final_weights(tmp_path / "final", cfg), final_weights(tmp_path / "run", cfg)
    assert set(final) == set(trained)
    for name in trained:
        assert torch.equal(final[name], trained[name]), name
    export_checkpoint(tmp_path / "run", tmp_path / "step3", step=3, log=quiet)
    loaded = load_model(find_model_files(run=tmp_path / "step3"))
    assert loaded.cfg.model == cfg.model and loaded.tokenizer.get_vocab_size() > 0
    assert not torch.equal(loaded.model.state_dict()["tok_embeddings.weight"], trained["tok_embeddings.weight"])
    with pytest.raises(CheckpointError, match="steps available: 3, 6"):
        export_checkpoint(tmp_path / "run", tmp_path / "none", step=4, log=quiet)


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5), ()])
def test_range_boxes_tile_any_flat_range(shape):
    numel = math.prod(shape)
    flat = torch.arange(numel).reshape(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            seen = []
            for offsets, sizes, first in range_boxes(shape, start, stop):
                region = flat[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                assert region.reshape(-1).tolist() == list(range(first, first + math.prod(sizes)))
                seen += region.reshape(-1).tolist()
            assert seen == list(range(start, stop))
            if len(shape) == 2:
                assert len(range_boxes(shape, start, stop)) <= 3
