"""Training, prediction and evaluation across two hosts (network namespaces, one torchrun agent
each, gloo over the hosts' link) give what one process gives.

dp2 x tp2 over 2 hosts puts each tp pair inside a host and dp across them; pp2 puts one stage
on each host. Losses within 1e-5 relative of one process (the parity tolerance of
test_parallel_training.py), final weights within 1e-4; `meshlm predict` writes the same
answers and `meshlm eval` reports the same loss as on one host.
"""

from __future__ import annotations

import json

import pytest

from meshlm.cli import main as cli_main
from multinode.cases import BASE, assert_same_losses, assert_same_weights, final_val_loss, single_process
from multinode.jobs import Job, logged_steps, sets


@pytest.fixture(scope="module")
def overrides(prepare_corpus):
    return BASE + [f'data.cache_dir="{prepare_corpus(BASE)}"']


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory):
    """One process: losses, final val loss, weights; its run directory serves predict and eval."""
    out = tmp_path_factory.mktemp("single")
    return (out, *single_process(overrides, out))


@pytest.mark.parametrize(
    "layout, nproc_per_node",
    [(["parallel.dp=2", "parallel.tp=2"], 2), (["parallel.pp=2"], 1)],
    ids=["dp2xtp2-tp-inside-hosts", "pp2-a-stage-per-host"],
)
def test_training_across_two_hosts_equals_one_process(
    layout, nproc_per_node, overrides, reference, make_hosts, tmp_path
):
    ref_dir, ref_losses, ref_val, ref_state = reference
    hosts = make_hosts(2)
    run = tmp_path / "run"
    job = Job(hosts, tmp_path, ["train", *sets(overrides + layout), "--out", str(run)], nproc_per_node=nproc_per_node)
    codes = job.start().wait(timeout=240)
    assert codes == {0: 0, 1: 0}, job.all_logs()
    held = json.loads((run / "state_bytes.json").read_text())
    assert [r["rank"] for r in held] == list(range(2 * nproc_per_node))
    assert_same_losses([r["loss"] for r in logged_steps(run)], ref_losses)
    assert abs(final_val_loss(run) - ref_val) <= 1e-5 * abs(ref_val)
    assert_same_weights(run, overrides, ref_state)


def _prompts(path):
    lines = [
        {"prompt": "def f(x):", "max_new_tokens": 12, "id": "a"},
        {"prompt": "class A:", "temperature": 1.0, "top_k": 20, "max_new_tokens": 9},
        {"prompt": "import os", "stop": ["\n"], "max_new_tokens": 20, "temperature": 0.8, "seed": 4},
        {"prompt": "return", "max_new_tokens": 5, "temperature": 1.2},
        {"prompt": "for i in range(", "max_new_tokens": 10},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_predict_and_eval_across_two_hosts_equal_one_host(reference, make_hosts, tmp_path, capsys):
    # --run-dir or --checkpoint, not --run: torchrun's own parser would take `--run` for an
    # abbreviation of its --run-path. predict uses the first, eval the second.
    model = str(reference[0] / "model.safetensors")
    src = tmp_path / "in.jsonl"
    _prompts(src)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(json.__doc__ * 3)
    predict = ["predict", "--run-dir", str(reference[0]), "--input", str(src), "--seed", "1", "--no-progress"]
    evaluate = ["eval", "--checkpoint", model, "--data", str(corpus), "--seq-len", "32", "--batch-size", "3", "--json"]

    assert cli_main([*predict, "--output", str(tmp_path / "one.jsonl")]) == 0
    assert cli_main(evaluate) == 0
    one_eval = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    hosts = make_hosts(2)
    job = Job(hosts, tmp_path, [*predict, "--output", str(tmp_path / "two.jsonl")], name="predict")
    assert job.start().wait(timeout=180) == {0: 0, 1: 0}, job.all_logs()
    one = (tmp_path / "one.jsonl").read_text().splitlines()
    assert len(one) == 5 and (tmp_path / "two.jsonl").read_text().splitlines() == one

    job = Job(hosts, tmp_path, evaluate, name="eval")
    assert job.start().wait(timeout=180) == {0: 0, 1: 0}, job.all_logs()
    two_eval = json.loads([line for line in job.log(0).splitlines() if line.startswith("{")][-1])
    assert two_eval["tokens"] == one_eval["tokens"] and two_eval["windows"] == one_eval["windows"]
    assert two_eval["loss"] == pytest.approx(one_eval["loss"], rel=1e-6)
