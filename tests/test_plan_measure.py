"""Picking the layout with measurements (`meshlm plan --measure-top`, `parallel.auto_measure`),
the ranking statistics, and the candidates chart (`meshlm plan --png`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from meshlm.config import ConfigError, load_config
from meshlm.plan.chart import pareto_front
from meshlm.plan.measure import regret, spearman

TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=301",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.max_bytes=200000",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def tiny_config(prepare_corpus, tmp_path_factory):
    """A config file of a tiny model whose corpus is already prepared."""
    cache = prepare_corpus(TINY)
    path = tmp_path_factory.mktemp("measure") / "tiny.toml"
    path.write_text(load_config(None, TINY + [f'data.cache_dir="{cache}"']).to_toml())
    return path


@pytest.fixture
def cpu_cache(tmp_path, monkeypatch):
    from test_planner import FIGURES

    from meshlm.plan import cpu_local

    monkeypatch.setenv("MESHLM_CACHE_DIR", str(tmp_path / "cache"))
    path = cpu_local.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**FIGURES, "version": cpu_local.VERSION}))
    return path


def _cli(argv: list[str], capsys) -> tuple[str, str]:
    from meshlm.plan.commands import add_commands

    parser = argparse.ArgumentParser(prog="meshlm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_spearman_and_regret():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # tied ranks averaged
    assert math.isnan(spearman([1.0], [2.0]))
    # the planner's first choice (predicted 0.1) measured 0.33 against the best measured 0.30
    assert regret([0.1, 0.2, 0.3], [0.33, 0.30, 0.5]) == pytest.approx(0.1)
    assert regret([0.3, 0.1], [0.5, 0.4]) == 0.0


def test_measure_top_times_layouts_through_the_launcher(tiny_config, cpu_cache, capsys):
    """The two best-predicted layouts of 2 processes, 2 steps each, each through
    `python -m meshlm train --nproc 2`: measured step times beside the predicted ranking."""
    argv = ["plan", "--config", str(tiny_config), "--cluster", "cpu-local", "--devices-per-node", "2"]
    out, err = _cli(argv + ["--measure-top", "2", "--measure-steps", "2", "--top", "3", "--json"], capsys)
    result = json.loads(out)
    measured = result["measured"]
    assert [m["predicted_rank"] for m in measured] == [1, 2]
    assert [(m["dp"], m["tp"], m["pp"]) for m in measured] == [
        (c["dp"], c["tp"], c["pp"]) for c in result["candidates"][:2]
    ]
    for m in measured:
        assert m["measure_error"] == "" and 0 < m["measured_step_time_s"] < 60, m
    summary = result["measured_summary"]
    assert summary["regret"] >= 0 and summary["spearman"] in (-1.0, 1.0)
    assert err.count("measuring ") == 2
    assert result["candidates"][0]["tokens_per_s"] > 0  # the predicted ranking is unchanged


def test_measure_top_refuses_other_machines(capsys):
    argv = ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--global-batch", "64", "--seq-len", "4096"]
    with pytest.raises(ConfigError, match="times layouts on this machine"):
        _cli(argv + ["--measure-top", "2"], capsys)
    with pytest.raises(ConfigError, match="at least 2"):
        _cli(argv + ["--measure-top", "2", "--measure-steps", "1"], capsys)


@pytest.mark.slow
def test_auto_measure_trains_with_the_measured_fastest(tiny_config, cpu_cache):
    from meshlm.plan.auto import choose_layout

    cfg = load_config(str(tiny_config), ["parallel.auto=true", "parallel.auto_measure=2"])
    logs: list[str] = []
    keys = choose_layout(cfg, 2, log=logs.append)
    table = next(line for line in logs if line.startswith("Measured on this machine"))
    best = next(line for line in table.splitlines() if line.startswith("Measured best: "))
    chosen = f"dp={keys['dp']} tp={keys['tp']} pp={keys['pp']} zero={keys['zero']}"
    assert best.removeprefix("Measured best: ").startswith(chosen), (best, keys)
    with pytest.raises(ConfigError, match="auto_measure"):
        load_config(None, ["parallel.auto_measure=-1"])


def test_png_chart_and_pareto_front(tmp_path, capsys):
    png = tmp_path / "plan.png"
    argv = ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--global-batch", "64", "--seq-len", "4096"]
    out, err = _cli(argv + ["--software", "megatron-flash", "--png", str(png), "--top", "2"], capsys)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "Pareto front" in err and "Best:" in out

    from meshlm.plan import Workload, make_cluster, model_preset, plan

    result = plan(Workload(model_preset("llama3-8b"), 64, 4096), make_cluster("dgx-h100"), "megatron-flash")
    front = pareto_front(result.estimates)
    fitting = [e for e in result.estimates if e.fits]
    assert front and all(e.fits for e in front)
    assert min(front, key=lambda e: e.step_time_s).step_time_s == min(e.step_time_s for e in fitting)
    for e in fitting:  # nothing fitting beats a front point on both axes
        assert not any(e.step_time_s < f.step_time_s and e.memory_gb_per_device < f.memory_gb_per_device for f in front)
