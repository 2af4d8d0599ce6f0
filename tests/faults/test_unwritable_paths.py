"""Outputs that cannot be written: under /proc, under a regular file, in a read-only directory
(a read-only mount: root ignores permission bits), a directory where a file is expected, a
file where a directory is expected. Each is refused before any work (exit 2, one message
naming the path and the fix) and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults.conftest import TINY, sets
from meshlm.cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("meshlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_training_outputs_that_cannot_be_written(fault_data, read_only_dir, tmp_path, capsys):
    """train --out and the data cache: refused before the corpus is read (no cache is created)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fresh_cache = tmp_path / "never-created-cache"
    cases = [
        (Path("/proc/meshlm-run"), "/proc does not accept new files"),
        (a_file / "run", f"{a_file}, which is a file"),
        (read_only_dir / "run", f"{read_only_dir} does not accept new files (Read-only file system)"),
        (a_file, f"{a_file} exists and is not a directory"),
    ]
    for out, expected in cases:
        argv = ["train", *sets([*TINY, f'data.cache_dir="{fresh_cache}"']), "--out", str(out)]
        assert main(argv) == 2, out
        message = _error(capsys)
        assert expected in message and "Choose another --out" in message, message
        assert not fresh_cache.exists(), "refused before the data was prepared"

    # A data directory that cannot be written, with a writable --out: also before any work.
    argv = ["train", *sets([*TINY, f'data.dir="{read_only_dir / "data"}"']), "--out", str(tmp_path / "ok")]
    assert main(argv) == 2
    message = _error(capsys)
    assert "cannot write the prepared data" in message and "data.dir" in message
    assert not (tmp_path / "ok").exists()
    assert main(["data", "prepare", "--out", "/proc/meshlm-data"]) == 2
    assert "/proc does not accept new files" in _error(capsys)


def test_predict_and_export_outputs_that_cannot_be_written(tiny_run, read_only_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "def "}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    predict = ["predict", "--run", str(tiny_run), "--input", str(prompts), "--max-new-tokens", "2", "--no-progress"]
    for output, expected in [
        (tmp_path, f"{tmp_path} is a directory, not a file"),
        (read_only_dir / "out.jsonl", "Read-only file system"),
        (Path("/proc/out.jsonl"), "/proc does not accept new files"),
        (a_file / "out.jsonl", f"{a_file} exists and is not a directory"),
    ]:
        assert main([*predict, "--output", str(output)]) == 2, output
        message = _error(capsys)
        assert expected in message and "--output" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in.jsonl", "read-only"], "no stray OUT.tmp"
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["existing.txt"]

    for out, expected in [(a_file, f"{a_file} exists and is not a directory"), (read_only_dir, "Read-only")]:
        assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 2
        message = _error(capsys)
        assert expected in message and "Choose another --out" in message, message
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("flag", ["--input", "--prompts"])
def test_a_directory_given_as_an_input_file_says_so(tiny_run, tmp_path, capsys, flag):
    if flag == "--input":
        argv = ["predict", "--run", str(tiny_run), "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl")]
    else:
        argv = ["generate", "--run", str(tiny_run), "--prompts", str(tmp_path), "--max-new-tokens", "1"]
    assert main(argv) == 2
    message = _error(capsys)
    assert f"{tmp_path} is a directory" in message and "not found" not in message
