"""Predict resumes only what the same model and settings produced (item 5), exits non-zero when
no line succeeded (item 10), and names a missing prompt for what it is (item 12)."""

from __future__ import annotations

import json
import shutil

from meshlm.cli import main


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_resume_refuses_answers_of_another_model_or_settings(tiny_run, tmp_path, capsys):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def ", "class ", "import ")))
    base = ["predict", "--input", str(source), "--output", str(output), "--no-progress", "--max-new-tokens", "4"]
    assert main([*base, "--run", str(tiny_run)]) == 0
    first = _records(output)
    assert len(first) == 3 and (tmp_path / "out.jsonl.settings.json").is_file()

    # What must not change the answers may change: the batch size.
    assert main([*base, "--run", str(tiny_run), "--max-batch", "2"]) == 0
    assert "3 already in" in _err(capsys)

    for extra, named in [
        (["--temperature", "0.7", "--seed", "1"], "--temperature: 0.0 before, 0.7 now"),
        (["--max-new-tokens", "5"], "--max-new-tokens: 4 before, 5 now"),
        (["--stop", "\n"], "--stop"),
        (["--ignore-eos"], "--ignore-eos"),
        (["--dtype", "bfloat16"], "--dtype"),
    ]:
        assert main([*base, "--run", str(tiny_run), *extra]) == 2, extra  # (a repeated option: the last wins)
        err = _err(capsys)
        assert "holds answers made with other settings" in err and named in err and "--overwrite" in err, err
    assert _records(output) == first, "a refused run leaves the answers as they were"

    # Another model: the same run, its weights replaced by an earlier checkpoint's.
    other = tmp_path / "other-model"
    assert main(["export", "--run", str(tiny_run), "--step", "2", "--out", str(other)]) == 0
    assert main([*base, "--run", str(other)]) == 2
    assert "the model weights: sha256" in _err(capsys)
    assert main([*base, "--run", str(other), "--overwrite"]) == 0
    assert "3 answered, 0 already" in _err(capsys)

    # Answers without the record of their settings are not trusted either.
    (tmp_path / "out.jsonl.settings.json").unlink()
    assert main([*base, "--run", str(other)]) == 2
    assert "not the record of how they were made" in _err(capsys)


def test_no_line_succeeded_is_a_failure_and_a_missing_prompt_is_named(tiny_run, tmp_path, capsys):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"text": "a document, not a prompt"}\nnot json\n{"prompt": 3}\n')
    argv = ["predict", "--run", str(tiny_run), "--input", str(source), "--output", str(output), "--no-progress"]
    assert main(argv) == 1
    err = _err(capsys)
    assert "0 answered, 0 already in" in err and "3 failed line(s)" in err and "no line of" in err
    errors = {r["line"]: r["error"] for r in _records(output)}
    assert 'the "prompt" is missing' in errors[1] and "'text' is not a field" in errors[1]
    assert "unknown field" not in errors[1]
    assert "not valid JSON" in errors[2] and '"prompt" must be a string' in errors[3]

    shutil.copy(source, tmp_path / "mixed.jsonl")
    with open(tmp_path / "mixed.jsonl", "a") as f:
        f.write('{"prompt": "def "}\n')
    argv[argv.index(str(source))] = str(tmp_path / "mixed.jsonl")
    assert main([*argv, "--overwrite"]) == 0  # one line succeeded: success, and the failures are counted
    assert "1 answered" in (err := _err(capsys)) and "3 failed line(s)" in err
