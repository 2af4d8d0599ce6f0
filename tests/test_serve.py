"""`meshlm serve` through the real `openai` client on a real server (loopback): completions
and chat, streamed and not, usage, n, seed, logprobs, echo, stop; greedy output equal to
`meshlm generate`; 400 / 401 / 404 in OpenAI's error shape; a client that hangs up frees
its slot; SIGTERM drains the in-flight request and exits 0 with no worker left.

One server (one engine worker) for the module; every request loop is bounded in count and time.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from serve_fixtures import Server, make_run

from meshlm.cli import main as cli_main

KEY = "sk-test-key"
PROMPTS = ["def ", "import sys\n", "class A:", "x"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--max-batch", "4", "--served-model-name", "tiny", api_key=KEY).wait_ready()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def test_completions_equal_meshlm_generate(server, client, run_dir, capsys):
    got = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0) for p in PROMPTS]
    args = ["generate", "--run", str(run_dir), "--temperature", "0", "--max-new-tokens", "12", "--max-batch", "2"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert cli_main(args) == 0
    shown = capsys.readouterr().out
    assert shown == "\n\n".join(p + r.choices[0].text for p, r in zip(PROMPTS, got)) + "\n"
    for r in got:
        assert r.object == "text_completion" and r.model == "tiny"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert (
            r.usage.completion_tokens <= 12
            and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )
    # the same request as token ids, and batched as a list of prompts
    ids = server.post("/tokenize", {"prompt": PROMPTS[0]}).json()["tokens"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == got[0].choices[0].text
    batch = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [r.choices[0].text for r in got[:2]]
    assert batch.usage.prompt_tokens == got[0].usage.prompt_tokens + got[1].usage.prompt_tokens


def test_streaming_with_usage_equals_the_plain_response(server, client):
    plain = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="def f(x):",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # chat, streamed and not
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 15 or chat.choices[0].finish_reason == "stop"
    stream = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    # the default template: "Role: content" lines, then "Assistant:"
    rendered = server.post("/tokenize", {"messages": messages}).json()
    text = server.post("/detokenize", {"tokens": rendered["tokens"]}).json()["prompt"]
    assert text == "System: Be brief.\nUser: def\nAssistant:"
    assert rendered["count"] == chat.usage.prompt_tokens


def test_sampling_fields(client):
    def complete(**kw):
        return client.completions.create(model="tiny", prompt="import ", max_tokens=16, **kw)

    a, b = complete(temperature=1.0, seed=11), complete(temperature=1.0, seed=11)
    assert a.choices[0].text == b.choices[0].text  # a seed fixes the output
    several = complete(temperature=1.0, seed=11, n=3, top_p=0.95, extra_body={"top_k": 50})
    texts = {c.index: c.text for c in several.choices}
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) > 1
    assert (
        texts[0] == complete(temperature=1.0, seed=11, top_p=0.95, extra_body={"top_k": 50}).choices[0].text
    )  # choice i: seed + i
    assert texts[1] == complete(temperature=1.0, seed=12, top_p=0.95, extra_body={"top_k": 50}).choices[0].text
    greedy = complete(temperature=0, logprobs=3)
    lp = greedy.choices[0].logprobs
    assert len(lp.tokens) == greedy.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0 and chosen == pytest.approx(max(top.values()))  # greedy = the best
    assert "".join(lp.tokens).startswith(greedy.choices[0].text[:3])
    echoed = complete(temperature=0, echo=True)
    assert echoed.choices[0].text == "import " + greedy.choices[0].text
    free = complete(temperature=0).choices[0].text
    stop = free[4:6]
    cut = complete(temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert client.models.list().data[0].id == "tiny"


def test_errors_in_openai_shape(server, client):
    base = {"model": "tiny", "prompt": "x", "max_tokens": 4}
    bad = {
        "unknown field": {**base, "temprature": 0.5},
        "bad value": {**base, "temperature": -1},
        "wrong type": {**base, "max_tokens": "many"},
        "n zero": {**base, "n": 0},
        "prompt too long": {**base, "prompt": [5] * 1030},
        "context exceeded": {**base, "max_tokens": 5000},
        "token id outside the vocabulary": {**base, "prompt": [1, 10_000]},
        "unsupported field": {**base, "logit_bias": {"5": 1.0}},
        "missing prompt": {"model": "tiny"},
    }
    for case, body in bad.items():
        r = server.post("/v1/completions", body)
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", case
        assert err["message"], case
    assert "temprature" in server.post("/v1/completions", bad["unknown field"]).json()["error"]["param"]
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=server.headers, timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    assert server.post("/v1/completions", {**base, "model": "gpt-4"}).status_code == 404
    # the task routes belong to task-model runs (test_serve_tasks.py): 400 naming the routes to use
    for path, body in (("/v1/classify", {"input": "x"}), ("/v1/tag", {"tokens": [["x"]]})):
        r = server.post(path, body)
        assert r.status_code == 400 and "language model" in r.json()["error"]["message"], r.text
        assert "/v1/completions" in r.json()["error"]["message"] and r.json()["error"]["code"] == "wrong_endpoint"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"best_of": 3})
    # the API key: every route but /health
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json=base, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_command_line_errors_come_before_any_worker_starts(server, run_dir, capsys):
    cases = {
        ("--max-batch", "0", "--max-model-len", "5000"): "--max-model-len must be between 2",
        ("--tp", "3"): "not divisible by 3",
        ("--port", str(server.port)): f"cannot listen on 127.0.0.1:{server.port}",  # in use
    }
    for extra, message in cases.items():
        assert cli_main(["serve", "--run", str(run_dir), *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli_main(["serve", "--run", str(run_dir / "nope")]) == 2
    assert "not a meshlm run directory" in capsys.readouterr().err


def _wait_for_free_slots(server, before: float) -> None:
    """The slot is free within a step, long before 1000 tokens, and nothing more is generated."""
    deadline = time.monotonic() + 5
    while server.metric("meshlm_cache_slots_in_use") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("meshlm_cache_slots_in_use") == 0
    generated = server.metric("meshlm_generation_tokens_total") - before
    time.sleep(0.3)
    assert server.metric("meshlm_generation_tokens_total") - before == generated < 1000


def test_a_client_that_hangs_up_frees_its_slot(server):
    aborted = server.metric('meshlm_requests_total{outcome="aborted"}')
    before = server.metric("meshlm_generation_tokens_total")
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=30) as r:
        lines = r.iter_lines()  # (leaving this iterator early would close the connection)
        events = 0
        while events < 5:
            events += next(lines).startswith("data: ")
        assert server.metric("meshlm_cache_slots_in_use") == 1  # still generating
    _wait_for_free_slots(server, before)  # the stream's connection is closed
    # a plain (not streamed) request whose client gives up waiting
    before = server.metric("meshlm_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", {**body, "stream": False}, timeout=httpx.Timeout(30, read=0.5))
    _wait_for_free_slots(server, before)
    assert server.metric('meshlm_requests_total{outcome="aborted"}') == aborted + 2


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    """Run last in this module: it stops the server."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 600, "temperature": 0, "stream": True, "ignore_eos": True}
    result = {}

    def consume():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        result["finish"] = chunks[-1]["choices"][0]["finish_reason"]
        result["text"] = "".join(c["choices"][0]["text"] for c in chunks)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10
    while server.metric("meshlm_cache_slots_in_use") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    code, output = server.stop()
    reader.join(30)
    assert code == 0, output[-2000:]
    assert result.get("finish") == "length" and len(result["text"]) > 100  # finished, not cut off
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
