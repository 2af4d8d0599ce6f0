"""The commands end to end on a tiny backbone: `meshlm finetune`, `meshlm predict` (--nproc 2
writes what --nproc 1 writes, for a classifier, a CRF tagger and a bidirectional LSTM tagger;
resumable; error records), `meshlm eval --json`; and the built-in datasets' derivation on a
known snippet."""

from __future__ import annotations

import ast
import json

import pytest
from task_fixtures import TINY_LSTM, classify_records, make_backbone, meshlm, ner_records, write_jsonl

from meshlm.tasks import datasets


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks-cli")
    make_backbone(root / "bb")
    write_jsonl(root / "c-train.jsonl", classify_records(48, 1))
    write_jsonl(root / "c-valid.jsonl", classify_records(16, 2))
    write_jsonl(root / "n-train.jsonl", ner_records(48, 1))
    write_jsonl(root / "n-valid.jsonl", ner_records(16, 2))
    common = ["--set", "task.epochs=2", "--set", "train.progress=false"]

    def finetune(task: str, data: str, out: str, backbone: str, *sets: str) -> None:
        files = ["--train", f"{data}-train.jsonl", "--valid", f"{data}-valid.jsonl"]
        extra = [a for x in sets for a in ("--set", x)]
        meshlm("finetune", "--task", task, *files, "--out", out, "--from", backbone, *common, *extra, cwd=root)

    finetune("classify", "c", "clf", "bb")
    finetune("ner", "n", "ner", "bb", "task.crf=true")
    make_backbone(root / "lstm-bb", TINY_LSTM)
    finetune("ner", "n", "ner-bi", "lstm-bb", "model.bidirectional=true")
    return root


def test_predict_nproc2_equals_nproc1_and_resumes(runs):
    lines = [json.dumps({"text": r["text"], "id": i}) for i, r in enumerate(classify_records(21, 3))]
    lines.insert(5, '{"txt": "typo"}')
    (runs / "in.jsonl").write_text("\n".join(lines) + "\n")
    meshlm("predict", "--run", "clf", "--input", "in.jsonl", "--output", "one.jsonl", cwd=runs)
    meshlm("predict", "--run", "clf", "--input", "in.jsonl", "--output", "two.jsonl", "--nproc", "2", cwd=runs)
    one = (runs / "one.jsonl").read_text()
    assert one == (runs / "two.jsonl").read_text()
    records = [json.loads(x) for x in one.splitlines()]
    assert [r["line"] for r in records] == list(range(1, 23))
    assert "error" in records[5] and records[5]["line"] == 6
    good = [r for r in records if "error" not in r]
    assert all(r["label"] in ("animal", "person", "place") and abs(sum(r["scores"].values()) - 1) < 1e-4 for r in good)
    assert [r["id"] for r in good] == list(range(21))
    again = meshlm("predict", "--run", "clf", "--input", "in.jsonl", "--output", "one.jsonl", cwd=runs)
    assert "0 answered, 21 already in" in again.stderr
    assert (runs / "one.jsonl").read_text() == one


def test_tagger_predict_nproc2_and_eval_json(runs):
    records = ner_records(19, 4)
    (runs / "tin.jsonl").write_text(
        "".join(json.dumps({"tokens": r["tokens"]}) + "\n" for r in records) + '{"text": "John Smith in Paris"}\n'
    )
    meshlm("predict", "--run", "ner", "--input", "tin.jsonl", "--output", "t1.jsonl", cwd=runs)
    meshlm("predict", "--run", "ner", "--input", "tin.jsonl", "--output", "t2.jsonl", "--nproc", "2", cwd=runs)
    assert (runs / "t1.jsonl").read_text() == (runs / "t2.jsonl").read_text()
    meshlm("predict", "--run", "ner-bi", "--input", "tin.jsonl", "--output", "b1.jsonl", cwd=runs)
    meshlm("predict", "--run", "ner-bi", "--input", "tin.jsonl", "--output", "b2.jsonl", "--nproc", "2", cwd=runs)
    assert (runs / "b1.jsonl").read_text() == (runs / "b2.jsonl").read_text()
    assert "bidirectional = true" in (runs / "ner-bi" / "config.toml").read_text()
    out = [json.loads(x) for x in (runs / "t1.jsonl").read_text().splitlines()]
    assert [len(r["tags"]) for r in out[:-1]] == [len(r["tokens"]) for r in records]
    assert out[-1]["tokens"] == ["John", "Smith", "in", "Paris"]
    proc = meshlm("eval", "--run", "ner", "--data", "n-valid.jsonl", "--json", cwd=runs)
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(scores) == {"task", "precision", "recall", "f1"}
    saved = json.loads((runs / "ner" / "eval_n-valid.json").read_text())
    assert saved["f1"] == scores["f1"]
    assert saved["f1"] == pytest.approx(json.loads((runs / "ner" / "eval_valid.json").read_text())["f1"], abs=1e-9)
    proc = meshlm("eval", "--run", "clf", "--data", "c-valid.jsonl", "--json", cwd=runs)
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"task", "accuracy", "macro_f1"}
    assert (runs / "clf" / "confusion_c-valid.png").is_file()


SNIPPET = """import os.path
from .pkg import name
@functools.cache
def load(path, *, mode="r"):
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return self.reader.read(path, size=4)
"""


def test_builtin_dataset_roles_from_the_syntax_tree():
    tree = ast.parse(SNIPPET)
    types, modules = datasets._entity_positions(tree)
    lines = list(datasets._logical_lines(SNIPPET))
    tagged = [
        [(t, tag) for (t, _, _), tag in zip(line, datasets._tag_line(line, types, modules)) if tag != "O"]
        for line in lines
    ]
    assert tagged == [
        [("os", "B-MODULE"), (".", "I-MODULE"), ("path", "I-MODULE")],
        [("pkg", "B-MODULE")],
        [("cache", "B-DECO")],
        [("load", "B-FUNC"), ("path", "B-PARAM"), ("mode", "B-PARAM")],
        [("exists", "B-CALL")],
        [("FileNotFoundError", "B-EXC")],
        [("read", "B-CALL")],
    ]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.lineno == 7]
    (srl,) = datasets._srl_examples(lines[-1], calls)
    roles = [(t, tag) for t, tag in zip(srl["tokens"], srl["tags"]) if tag != "O"]
    assert srl["tokens"][srl["predicate"]] == "read"
    assert roles == [
        ("self", "B-ARG0"), (".", "I-ARG0"), ("reader", "I-ARG0"), ("path", "B-ARG1"),
        ("size", "B-ARGM-KW"), ("=", "I-ARGM-KW"), ("4", "I-ARGM-KW"),
    ]  # fmt: skip


def test_default_backbone_is_found_by_any_path_to_its_cache(tmp_path, monkeypatch):
    # `meshlm finetune` in a folder (relative .meshlm-cache) and a script naming the same cache
    # by its absolute path must share one backbone, not pretrain a second one.
    from meshlm.tasks.default_backbone import default_backbone_dir

    monkeypatch.chdir(tmp_path)
    relative = default_backbone_dir(".meshlm-cache")
    absolute = default_backbone_dir(tmp_path / ".meshlm-cache")
    assert relative.name.startswith("default-") and absolute == tmp_path / relative
