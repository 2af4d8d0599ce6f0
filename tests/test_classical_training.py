"""Full-pass training methods against the single process (float32, gloo, forked ranks):
Baum-Welch EM for the hmm family under dp2 and dp4, full-batch L-BFGS for maxent under dp2,
and resuming either from a checkpoint written by another layout."""

from __future__ import annotations

import math

import pytest
import torch
from training_runs import final_weights, quiet, run_training

from meshlm.config import load_config
from meshlm.train.checkpoint import export_checkpoint
from meshlm.train.checkpoint_manifest import step_dir
from meshlm.train.metrics import read_metrics

BASE = [
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=60000",
    "train.micro_batch=32",
    "train.global_batch=128",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.progress=false",
]
EM = ['model.family="hmm"', "model.n_states=16", 'train.optimizer="em"', "train.steps=3", "train.eval_every=3"]
LBFGS = [
    'model.family="maxent"',
    "model.order=3",
    "model.hash_rows=64",
    'train.optimizer="lbfgs"',
    "train.lbfgs_l2=0.001",
    "train.steps=5",
    "train.eval_every=5",
]


@pytest.fixture(scope="module")
def data_cache(prepare_corpus):
    return prepare_corpus(BASE)


def _config(cache, method, extra=()):
    return load_config(None, BASE + method + [f'data.cache_dir="{cache}"', *extra])


def _assert_same(ref, got, loss_rtol, param_atol, ref_dir, got_dir, cfg, resumed_at=0):
    """The run in got_dir (resumed at step `resumed_at`, or from the start) equals ref_dir's."""
    (ref_losses, ref_val), (losses, val) = ref, got
    assert len(losses) == len(ref_losses) - resumed_at
    for step, (a, b) in enumerate(zip(losses, ref_losses[resumed_at:]), start=resumed_at + 1):
        assert math.isclose(a, b, rel_tol=loss_rtol), f"step {step}: {a} vs single process {b}"
    assert math.isclose(val, ref_val, rel_tol=loss_rtol), f"val loss {val} vs {ref_val}"
    want, have = final_weights(ref_dir, cfg), final_weights(got_dir, cfg)
    for name, value in want.items():
        # EM without smoothing gives tokens never seen in training probability 0 (log -inf)
        assert torch.equal(torch.isinf(have[name]), torch.isinf(value)), f"{name}: zero probabilities differ"
        finite = torch.isfinite(value)
        diff = (have[name][finite] - value[finite]).abs().max().item()
        assert diff <= param_atol, f"{name}: max abs difference {diff}"


def test_em_under_dp2_and_dp4_equals_one_process_and_never_decreases(data_cache, tmp_path):
    """3 Baum-Welch iterations: the objective per token within 1e-6 relative, the parameters
    (log-probabilities) within 1e-6; the log-likelihood increases at every iteration."""
    cfg = _config(data_cache, EM)
    ref = run_training(1, cfg, tmp_path / "one")
    losses = ref[0]
    assert all(b < a for a, b in zip(losses, losses[1:])), f"EM's loss must fall every iteration: {losses}"
    records = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["tokens_per_s"] > 0
    for world in (2, 4):
        got = run_training(world, _config(data_cache, EM, [f"parallel.dp={world}"]), tmp_path / f"dp{world}")
        _assert_same(ref, got, 1e-6, 1e-6, tmp_path / "one", tmp_path / f"dp{world}", cfg)
    pi = torch.softmax(final_weights(tmp_path / "one", cfg)["chain.0.initial"], -1)
    assert math.isclose(float(pi.sum()), 1.0, rel_tol=1e-6)


def test_em_resumes_across_layouts(data_cache, tmp_path):
    """Checkpoint after iteration 2 on dp2, resume on one process: iteration 3 is the same."""
    cfg = _config(data_cache, EM, ["parallel.dp=2", "train.checkpoint_every=1"])
    source = run_training(2, cfg, tmp_path / "a")
    one = _config(data_cache, EM)
    resumed = run_training(1, one, tmp_path / "b", resume=str(step_dir(tmp_path / "a", 2)))
    _assert_same(source, resumed, 1e-6, 1e-6, tmp_path / "a", tmp_path / "b", one, resumed_at=2)
    # export consolidates the dp2 run's last checkpoint into the model it ended with
    export_checkpoint(tmp_path / "a", tmp_path / "exported", log=quiet)
    final, exported = final_weights(tmp_path / "a", cfg), final_weights(tmp_path / "exported", cfg)
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)


def test_lbfgs_under_dp2_equals_one_process_and_resumes_its_history(data_cache, tmp_path):
    """5 full-batch L-BFGS iterations on maxent: dp2 equals one process (loss 1e-5 relative,
    parameters 1e-4); the objective falls; resuming the dp2 run on one process at step 3 (the
    L-BFGS history comes from the checkpoint) continues identically."""
    cfg = _config(data_cache, LBFGS)
    ref = run_training(1, cfg, tmp_path / "one")
    assert all(b < a for a, b in zip(ref[0], ref[0][1:])), f"L-BFGS must decrease the objective: {ref[0]}"
    dp2 = _config(data_cache, LBFGS, ["parallel.dp=2", "train.checkpoint_every=3"])
    got = run_training(2, dp2, tmp_path / "dp2")
    _assert_same(ref, got, 1e-5, 1e-4, tmp_path / "one", tmp_path / "dp2", cfg)
    resumed = run_training(1, cfg, tmp_path / "resumed", resume=str(step_dir(tmp_path / "dp2", 3)))
    _assert_same(got, resumed, 1e-5, 1e-4, tmp_path / "dp2", tmp_path / "resumed", cfg, resumed_at=3)


@pytest.mark.parametrize(
    "family, src_world, src_layout, dst_world, dst_layout",
    [
        # vocabulary-column shards (301 columns padded to 302) into ZeRO-1 ranges
        ("hmm", 2, ["parallel.tp=2"], 2, ["parallel.dp=2", "parallel.zero=1"]),
        # FSDP2 row chunks of the hashed tables into vocabulary-column shards
        ("maxent", 2, ["parallel.dp=2", "parallel.zero=3"], 2, ["parallel.tp=2"]),
    ],
    ids=["hmm-tp2-to-zero1", "maxent-zero3-to-tp2"],
)
def test_gradient_training_resumes_across_layouts(
    family, src_world, src_layout, dst_world, dst_layout, data_cache, tmp_path
):
    method = {
        "hmm": ['model.family="hmm"', "model.n_states=16"],
        "maxent": ['model.family="maxent"', "model.hash_rows=64", "model.init_std=0.1"],
    }[family] + ["train.steps=4", "train.eval_every=4", "train.global_batch=8", "train.micro_batch=4", "train.lr=0.01"]
    source = run_training(
        src_world, _config(data_cache, method, [*src_layout, "train.checkpoint_every=2"]), tmp_path / "a"
    )
    dst = _config(data_cache, method, dst_layout)
    resumed = run_training(dst_world, dst, tmp_path / "b", resume=str(step_dir(tmp_path / "a", 2)))
    _assert_same(source, resumed, 1e-5, 1e-4, tmp_path / "a", tmp_path / "b", dst, resumed_at=2)


def test_sgd_under_fsdp_dp2_equals_one_process(data_cache, tmp_path):
    """maxent trained by plain SGD (train.optimizer="sgd"): ZeRO-3 over dp2 equals one process."""
    method = [
        'model.family="maxent"',
        "model.hash_rows=64",
        'train.optimizer="sgd"',
        "train.lr=0.5",
        "train.steps=5",
        "train.eval_every=5",
        "train.global_batch=8",
        "train.micro_batch=4",
    ]
    ref = run_training(1, _config(data_cache, method), tmp_path / "one")
    assert ref[0][-1] < ref[0][0]
    got = run_training(2, _config(data_cache, method, ["parallel.dp=2", "parallel.zero=3"]), tmp_path / "dp2")
    _assert_same(ref, got, 1e-5, 1e-4, tmp_path / "one", tmp_path / "dp2", _config(data_cache, method))
