"""Config loading, overrides and every user error: each names the key and the fix."""

import subprocess
import sys

import pytest

from meshlm.config import CONFIG_DIR, Config, ConfigError, config_from_dict, load_config


def test_default_config_loads_and_round_trips_through_toml(tmp_path):
    cfg = load_config()
    assert cfg.model.arch == "llama" and cfg.data.source == "python-stdlib"
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_builtin_config_is_valid(name):
    load_config(name)


def test_overrides_are_typed_and_repeatable():
    cfg = load_config(
        None,
        [
            "train.steps=7",
            "train.lr=0.01",
            "model.arch=gpt2",
            "model.n_kv_heads=0",
            "train.dtype=bfloat16",
            "parallel.pp_split=[1, 3]",
            "train.progress=false",
        ],
    )
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.model.arch == "gpt2"
    assert cfg.train.dtype == "bfloat16" and cfg.parallel.pp_split == [1, 3] and cfg.train.progress is False
    # an int where a float is expected is fine
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, expected",
    [
        (["train.stpes=3"], "did you mean 'train.steps'"),
        (["trian.steps=3"], "did you mean 'train'"),
        (["model.n_head=3"], "did you mean 'model.n_heads'"),
        (["train.steps=abc"], "'train.steps' expects an integer"),
        (["train.steps=1.5"], "'train.steps' expects an integer"),
        (["model.arch=bert"], "'model.arch' expects one of 'llama', 'gpt2'"),
        (["train.dtype=float16"], "'train.dtype'"),
        (["train.steps=0"], "'train.steps' must be a positive integer"),
        (["model.n_heads=3"], "'model.d_model' (128) must be divisible by 'model.n_heads' (3)"),
        (["model.n_kv_heads=3"], "'model.n_heads' (4) must be divisible by 'model.n_kv_heads' (3)"),
        (["data.seq_len=4096"], "'data.seq_len' (4096) exceeds 'model.max_seq_len'"),
        (["train.global_batch=20"], "'train.global_batch' (20) must be a multiple"),
        (["parallel.zero=4"], "'parallel.zero' must be 0, 1, 2 or 3"),
        (["steps=3"], "must name a section and a key"),
        (["train.steps"], "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert expected in str(info.value)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        load_config(str(path))


def test_missing_config_file_lists_builtins():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-config")


def test_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))


def test_config_show_cli_prints_resolved_toml():
    out = subprocess.run(
        [sys.executable, "-m", "meshlm", "config", "show", "--set", "train.steps=11"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[train]" in out and "steps = 11" in out
    assert config_from_dict(__import__("tomllib").loads(out)).train.steps == 11


def test_cli_exits_nonzero_with_one_message_on_bad_key():
    proc = subprocess.run(
        [sys.executable, "-m", "meshlm", "train", "--set", "train.stpes=3"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "did you mean 'train.steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fingerprint_tracks_what_is_trained():
    a, b = Config(), Config()
    assert a.fingerprint() == b.fingerprint()
    b.model.d_model = 256
    assert a.fingerprint() != b.fingerprint()


def test_parallel_auto_in_toml_and_override(tmp_path):
    path = tmp_path / "auto.toml"
    path.write_text('parallel = "auto"\n[train]\nsteps = 3\n')
    assert load_config(str(path)).parallel.auto is True
    assert load_config(None, ["parallel.auto=true"]).parallel.auto is True
    assert load_config(None).parallel.auto is False
