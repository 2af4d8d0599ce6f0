"""Every weights file meshlm writes has a manifest (size, sha256) that loading checks (item 11):
a file altered in place is refused by name (--no-verify skips the sha256, not the size), weights
that are not finite are refused with the tensor's name, and files get the usual 0644 mode."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch

from meshlm.artifacts.weights_file import load_weights, save_weights
from meshlm.artifacts.weights_manifest import manifest_path
from meshlm.cli import main
from meshlm.config import ConfigError, load_config


def _copy_run(tiny_run, dest):
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def _flip_a_weight_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data: the file still parses, with another value
    path.write_bytes(bytes(data))


def test_weights_altered_in_place_are_refused_unless_told_otherwise(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    weights = run / "model.safetensors"
    manifest = json.loads(manifest_path(weights).read_text())
    assert manifest["files"]["model.safetensors"]["bytes"] == weights.stat().st_size
    _flip_a_weight_byte(weights)
    argv = ["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "2", "--temperature", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"model weights {weights} do not match the sha256" in err and "--no-verify" in err
    assert main([*argv, "--no-verify"]) == 0  # the user's call, for a file too large to hash

    with open(weights, "ab") as f:
        f.write(b"\0" * 16)
    assert main([*argv, "--no-verify"]) == 2  # the size is always checked
    assert "truncated, or replaced" in capsys.readouterr().err


def test_non_finite_weights_are_refused_by_tensor_name(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = load_config(str(run / "config.toml"))
    state = load_weights(run / "model.safetensors", cfg.model).state_dict()
    state["layers.1.attention.wq.weight"][0, 3] = float("inf")
    save_weights(state, cfg.model, run / "model.safetensors")  # a consistent manifest: only the values are bad
    with pytest.raises(ConfigError, match=r"tensor 'layers.1.attention.wq.weight' holds 1 non-finite"):
        load_weights(run / "model.safetensors", cfg.model)
    assert main(["eval", "--run", str(run), "--data", str(run / "config.toml")]) == 2
    assert "layers.1.attention.wq.weight" in capsys.readouterr().err
    state["layers.1.attention.wq.weight"][0, 3] = float("-inf")
    save_weights(state, cfg.model, run / "model.safetensors")
    with pytest.raises(ConfigError, match=r"'layers.1.attention.wq.weight' holds 1 non-finite"):
        load_weights(run / "model.safetensors", cfg.model)


def test_log_probability_weights_may_hold_minus_infinity(tmp_path):
    """An HMM's logits are -inf where EM counted nothing (probability zero): loaded; NaN or +inf
    there are still refused."""
    from meshlm.model.registry import build_model

    cfg = load_config("hmm-tiny", ["model.n_states=4", "model.vocab_size=300"])
    state = build_model(cfg.model, seed=0).state_dict()
    state["emission.weight"][1, 7] = float("-inf")
    state["chain.0.transition"][0, 2] = float("-inf")
    path = tmp_path / "model.safetensors"
    save_weights(state, cfg.model, path)
    loaded = load_weights(path, cfg.model).state_dict()
    assert loaded["emission.weight"][1, 7] == float("-inf")
    for bad in (float("nan"), float("inf")):
        state["emission.weight"][1, 7] = bad
        save_weights(state, cfg.model, path)
        with pytest.raises(ConfigError, match=r"tensor 'emission.weight' holds 1 non-finite"):
            load_weights(path, cfg.model)


def test_every_weights_file_has_a_manifest_and_mode_0644(tiny_run, tmp_path):
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    old = __import__("os").umask(0o022)
    try:
        assert main(["export", "--run", str(tiny_run), "--step", "2", "--out", str(tmp_path / "exported")]) == 0
        assert main(["convert", "--to-hf", "--run", str(tiny_run), "--out", str(tmp_path / "hf")]) == 0
    finally:
        __import__("os").umask(old)
    for folder in (tiny_run, tmp_path / "exported", tmp_path / "hf"):
        weights = folder / "model.safetensors"
        assert mode(weights) == 0o644 and mode(manifest_path(weights)) == 0o644, folder
        assert mode(folder / "config.toml" if (folder / "config.toml").exists() else folder / "config.json") == 0o644
        record = json.loads(manifest_path(weights).read_text())["files"]["model.safetensors"]
        assert record["bytes"] == weights.stat().st_size
    cfg = load_config(str(tiny_run / "config.toml"))
    exported = load_weights(tmp_path / "exported" / "model.safetensors", cfg.model)
    assert all(torch.isfinite(v).all() for v in exported.state_dict().values())
