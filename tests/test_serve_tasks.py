"""`meshlm serve --run TASK_RUN`: /v1/classify and /v1/tag on a real server on loopback (httpx:
the openai client has no custom routes). Answers equal what `meshlm predict --run` writes for
the same inputs; bad requests and the other kind's routes answer 400 with a message; the API
key is enforced. (A language-model run refusing the task routes: test_serve.py's errors test.)"""

from __future__ import annotations

import json

import httpx
import pytest
from serve_fixtures import Server
from task_fixtures import classify_records, make_backbone, meshlm, ner_records, write_jsonl

KEY = "sk-task"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-tasks")
    make_backbone(root / "bb")
    common = ["--from", "bb", "--set", "task.epochs=1", "--set", "train.progress=false"]
    for task, records in (
        ("classify", classify_records),
        ("ner", ner_records),
        ("srl", lambda n, s: ner_records(n, s, predicate=True)),
    ):
        write_jsonl(root / f"{task}-train.jsonl", records(32, 1))
        write_jsonl(root / f"{task}-valid.jsonl", records(8, 2))
        meshlm("finetune", "--task", task, "--train", f"{task}-train.jsonl", "--valid", f"{task}-valid.jsonl",
               "--out", task, *common, cwd=root)  # fmt: skip
    return root


def predicted(root, run: str, lines: list[dict]) -> list[dict]:
    """What `meshlm predict --run` writes for these input lines."""
    write_jsonl(root / f"{run}-in.jsonl", lines)
    out = root / f"{run}-out.jsonl"
    meshlm("predict", "--run", run, "--input", f"{run}-in.jsonl", "--output", out.name, "--overwrite", cwd=root)
    return [json.loads(x) for x in out.read_text().splitlines()]


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_classify_equals_predict_and_errors(runs):
    texts = [r["text"] for r in classify_records(20, 3)]
    expected = predicted(runs, "classify", [{"text": t} for t in texts])
    server = Server(runs / "classify", "--max-batch", "4", "--max-queued", "28", api_key=KEY).wait_ready()
    try:
        r = server.post("/v1/classify", {"model": "classify", "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "classify"
        assert [d["index"] for d in body["data"]] == list(range(20))
        assert [{"label": d["label"], "scores": d["scores"]} for d in body["data"]] == [
            {"label": e["label"], "scores": e["scores"]} for e in expected
        ]
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 20
        one = server.post("/v1/classify", {"input": texts[7]}).json()  # a string: one answer, the same
        assert one["data"] == [{**body["data"][7], "index": 0}]

        assert_error(server.post("/v1/classify", {"input": []}), 400, "empty")
        assert_error(server.post("/v1/classify", {"input": ["fine", "  "]}), 400, "input[1]", "empty")
        assert_error(server.post("/v1/classify", {"input": "x", "temperature": 0}), 400, "temperature")
        assert_error(server.post("/v1/classify", {"input": ["x"] * 33}), 400, "at most 32")
        assert_error(server.post("/v1/classify", {"model": "other", "input": "x"}), 404, "'classify'")
        prompt = {"model": "classify", "prompt": "x"}
        assert_error(server.post("/v1/completions", prompt), 400, "/v1/classify", "does not generate")
        assert_error(server.post("/v1/chat/completions", {}), 400, "/v1/classify")
        assert_error(server.post("/v1/tag", {"input": "x"}), 400, "POST /v1/classify")

        assert httpx.post(server.url + "/v1/classify", json={"input": "x"}, timeout=10).status_code == 401
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
        models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["classify"]
        assert server.metric('meshlm_requests_total{outcome="stop"}') == 2
    finally:
        code, out = server.stop()
    assert code == 0, out


def test_tag_ner_and_srl_equal_predict_and_errors(runs):
    records = ner_records(9, 5, predicate=True)
    text = "John Smith sat in Paris ."
    expected = predicted(runs, "ner", [{"tokens": r["tokens"]} for r in records] + [{"text": text}])
    srl_expected = predicted(runs, "srl", [{"tokens": r["tokens"], "predicate": r["predicate"]} for r in records])
    ner = Server(runs / "ner", api_key=KEY)
    srl = Server(runs / "srl", api_key=KEY)
    try:
        ner.wait_ready(), srl.wait_ready()
        body = ner.post("/v1/tag", {"tokens": [r["tokens"] for r in records]}).json()
        got = [{"tokens": d["tokens"], "tags": d["tags"]} for d in body["data"]]
        assert got == [{"tokens": r["tokens"], "tags": e["tags"]} for r, e in zip(records, expected)]
        by_text = ner.post("/v1/tag", {"input": text}).json()["data"][0]
        assert (by_text["tokens"], by_text["tags"]) == (expected[-1]["tokens"], expected[-1]["tags"])
        assert body["usage"]["prompt_tokens"] >= sum(len(r["tokens"]) for r in records)

        sent = {"tokens": [r["tokens"] for r in records], "predicate": [r["predicate"] for r in records]}
        data = srl.post("/v1/tag", sent).json()["data"]
        assert [d["tags"] for d in data] == [e["tags"] for e in srl_expected]

        assert_error(srl.post("/v1/tag", {"tokens": [["a", "b"]]}), 400, "predicate")
        assert_error(srl.post("/v1/tag", {"tokens": [["a", "b"]], "predicate": [5]}), 400, "tokens[0]", "predicate")
        assert_error(srl.post("/v1/tag", {"tokens": [["a"]], "predicate": [0, 0]}), 400, "one per input")
        assert_error(ner.post("/v1/tag", {"tokens": [["a"]], "predicate": 0}), 400, "srl")
        assert_error(ner.post("/v1/tag", {"input": "x", "tokens": [["x"]]}), 400, "not both")
        assert_error(ner.post("/v1/tag", {"input": [" "]}), 400, "no words")
        assert_error(ner.post("/v1/tag", {"tokens": []}), 400, "empty")
        assert_error(ner.post("/v1/classify", {"input": "x"}), 400, "ner", "POST /v1/tag")
        assert_error(ner.post("/tokenize", {"prompt": "x"}), 400, "/v1/tag")
        assert httpx.post(ner.url + "/v1/tag", json={"input": "x"}, timeout=10).status_code == 401
    finally:
        results = [s.stop() for s in (ner, srl)]
    assert [code for code, _ in results] == [0, 0], results
