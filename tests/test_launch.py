"""`meshlm train --nproc N` (torch.distributed.run underneath) and the layout errors that must
stop a launch before any worker or process group exists."""

import json
import subprocess
import sys
import time

import pytest

from meshlm.config import ConfigError, load_config
from meshlm.distributed.dims import parallel_dims_from_config

SMALL = [
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=300000",
    "train.steps=4",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.sample_tokens=4",
    "train.progress=false",
]


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _train(tmp_path, out, *extra, nproc=None):
    cmd = [
        sys.executable,
        "-m",
        "meshlm",
        "train",
        *_sets(SMALL + [f'data.cache_dir="{tmp_path / "cache"}"', *extra]),
        "--out",
        str(out),
    ]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_nproc_launch_trains_like_one_process_and_exits_zero(tmp_path):
    single = _train(tmp_path, tmp_path / "single")
    assert single.returncode == 0, single.stderr
    multi = _train(tmp_path, tmp_path / "multi", "parallel.dp=2", "parallel.zero=1", nproc=2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "terminate called" not in multi.stderr
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    held = json.loads((tmp_path / "multi" / "state_bytes.json").read_text())
    assert [r["rank"] for r in held] == [0, 1]


@pytest.mark.parametrize(
    "nproc, overrides, expected",
    [
        (3, ["parallel.tp=2"], "world size 3 is not divisible by tp x pp = 2 x 1"),
        (4, ["parallel.dp=3"], "dp x tp x pp = 3 x 1 x 1 = 3 but the world size is 4"),
        (4, ["parallel.tp=4"], "model.n_kv_heads (2) is not divisible by 4. Use tp among 1, 2"),
        (2, ["parallel.tp=2", "model.ffn_hidden=351"], "model.ffn_hidden (351) is not divisible by 2. Use tp among 1"),
        (2, ["parallel.pp=2", "model.n_layers=1"], "model.n_layers (1) is less than the number of pipeline stages"),
        (
            4,
            ["parallel.pp=4", "parallel.pp_microbatches=2", "train.micro_batch=4"],
            "parallel.pp_microbatches (2) is fewer than the pipeline stages pp (4)",
        ),
        (2, ["parallel.pp=2", 'parallel.pp_schedule="interleaved-1f1b"'], "needs parallel.pp_virtual_stages >= 2"),
        (2, ["parallel.dp_replicate=2"], "needs parallel.zero=3"),
    ],
)
def test_impossible_layouts_fail_before_any_worker_starts(tmp_path, nproc, overrides, expected):
    started = time.perf_counter()
    proc = _train(tmp_path, tmp_path / "run", *overrides, nproc=nproc)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "torch.distributed.elastic" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="'parallel.pp_schedule' expects one of 'gpipe', '1f1b'"):
        load_config(None, ['parallel.pp_schedule="looped"'])


def test_dims_resolve_auto_dp_and_coordinates():
    cfg = load_config(None, SMALL + ["parallel.tp=2", "parallel.pp=2"])
    dims = parallel_dims_from_config(cfg, 8)
    assert (dims.dp, dims.tp, dims.pp) == (2, 2, 2)
    assert dims.coordinates(5) == {"pp": 1, "dp": 0, "tp": 1, "dp_replicate": 0, "dp_shard": 0}


def test_torchrun_command_line_works_unchanged(tmp_path):
    """`torchrun --nproc-per-node 2 -m meshlm train ...` (torch.distributed.run is torchrun)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "meshlm",
        "train",
        *_sets(SMALL + [f'data.cache_dir="{tmp_path / "cache"}"', "parallel.tp=2"]),
        "--out",
        str(tmp_path / "tr"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_losses(tmp_path / "tr")) == 4 and (tmp_path / "tr" / "model.safetensors").is_file()


def test_parallel_auto_lets_the_planner_choose(tmp_path, monkeypatch):
    """parallel.auto=true: the planner measures this machine (once, cached), picks a layout for
    the world size, logs it with the runner-up, and the run trains with it."""
    import os
    import tomllib

    monkeypatch.setenv("MESHLM_CACHE_DIR", str(tmp_path / "planner-cache"))
    proc = _train(tmp_path, tmp_path / "auto", "parallel.auto=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel = auto:" in proc.stdout + proc.stderr and "runner-up" in proc.stdout + proc.stderr
    chosen = tomllib.loads((tmp_path / "auto" / "config.toml").read_text())["parallel"]
    assert chosen["auto"] is False
    assert chosen["tp"] * chosen["pp"] * (2 // (chosen["tp"] * chosen["pp"])) == 2
    assert len(_losses(tmp_path / "auto")) == 4
    assert os.listdir(tmp_path / "planner-cache")
