"""Non-finite settings are refused before any work (item 6), and a run directory where a run
started but never completed a step does not block the corrected rerun."""

from __future__ import annotations

import pytest

from faults.conftest import TINY, sets, tiny_overrides
from meshlm.artifacts.run_dir import init_run_dir
from meshlm.cli import main
from meshlm.config import ConfigError, load_config


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=inf", "train.weight_decay=-inf", "model.norm_eps=nan"])
def test_non_finite_values_are_refused_before_work(override, tmp_path, capsys):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' is .*not a finite number"):
        load_config(None, [override])
    cache = tmp_path / "cache"
    argv = ["train", *sets([*TINY, f'data.cache_dir="{cache}"', override]), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_a_run_directory_without_a_completed_step_is_reused(fault_data, tmp_path, capsys):
    """What a run that failed before its first step leaves (config.toml, an empty metrics.jsonl,
    tokenizer.json) does not need --overwrite; a run with a completed step still does."""
    run = tmp_path / "run"
    started = load_config(None, tiny_overrides(fault_data, "train.lr=0.5", "train.steps=2"))
    init_run_dir(run, started, overwrite=False)
    (run / "metrics.jsonl").touch()
    (run / "tokenizer.json").write_text("{}")

    corrected = tiny_overrides(fault_data, "train.lr=0.01", "train.steps=2")
    assert main(["train", *sets(corrected), "--out", str(run)]) == 0
    assert "lr = 0.01" in (run / "config.toml").read_text()

    other = tiny_overrides(fault_data, "train.lr=0.02", "train.steps=2")
    assert main(["train", *sets(other), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a different run" in err and "--overwrite" in err
