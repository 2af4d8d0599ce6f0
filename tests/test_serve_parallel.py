"""`meshlm serve --tp 2` and `--replicas 2`: the same greedy output as one process, concurrent
clients over two replicas, 429 past the queue bound while every admitted request completes,
a crashed engine (unhealthy, 503, no hang), and no worker left behind when the server is
killed outright or stopped.

Each server is a real process on loopback, its engine ranks real processes (gloo for tp).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from serve_fixtures import Server, make_run

from meshlm.data.tokenizer import end_of_text_id
from meshlm.inference.engine import Engine, Request
from meshlm.inference.loading import find_model_files, load_model
from meshlm.inference.sampling import SamplingParams

PROMPTS = ["def ", "import sys\n", "class A:", "x = [", "return"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve-parallel-run"))


@pytest.fixture(scope="module")
def reference(run_dir):
    """Greedy completions of PROMPTS by the engine in this process (what `meshlm generate` prints)."""
    loaded = load_model(find_model_files(run=run_dir))
    params = SamplingParams(
        max_new_tokens=MAX_TOKENS, temperature=0, stop_token_ids=(end_of_text_id(loaded.tokenizer),)
    )
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=4)
    return [c.text for c in engine.generate([Request(loaded.tokenizer.encode(p).ids, params) for p in PROMPTS])]


def _complete(server: Server, prompt: str, max_tokens: int = MAX_TOKENS, **kw) -> httpx.Response:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return server.post("/v1/completions", body)


def _concurrently(fn, args: list, timeout: float = 120.0) -> list:
    """fn(*a) for every a on its own thread at once; results in order (bounded in time)."""
    results: list = [None] * len(args)

    def run(i, a):
        try:
            results[i] = fn(*a)
        except Exception as e:  # reported as the result
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a request did not finish in time"
    return results


@pytest.mark.slow  # two servers' worth of processes: a minute or more on a busy 2-core machine
def test_tp2_equals_one_process_and_leaves_no_orphan(run_dir, reference):
    server = Server(run_dir, "--tp", "2", "--max-batch", "3").wait_ready()
    try:
        assert len(server.engine_pids()) == 2
        got = _concurrently(lambda p: _complete(server, p).json()["choices"][0]["text"], [(p,) for p in PROMPTS])
        assert got == reference  # token for token
    finally:
        # The front killed outright (no chance to clean up): the kernel takes its workers down.
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        server.assert_no_workers_left()


@pytest.mark.slow
def test_replicas_queue_bound_crash_and_drain(run_dir, reference):
    # 2 replicas x 1 slot + 1 waiting: at most 3 sequences in flight.
    server = Server(run_dir, "--replicas", "2", "--max-batch", "1", "--max-queued", "1").wait_ready()
    try:
        assert len(server.engine_pids()) == 2
        # concurrent clients over both replicas: the outputs of one process
        got = _concurrently(lambda p: _complete(server, p).json()["choices"][0]["text"], [(p,) for p in PROMPTS[:3]])
        assert got == reference[:3]

        # both replicas busy at once (least-loaded dispatch), then past the bound: 429
        def long_request(i):
            return _complete(server, f"x{i}", max_tokens=400, ignore_eos=True)

        peak = {"slots": 0}

        def watch():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and peak["slots"] < 2:
                peak["slots"] = max(peak["slots"], server.metric("meshlm_cache_slots_in_use"))

        watcher = threading.Thread(target=watch)
        watcher.start()
        responses = _concurrently(long_request, [(i,) for i in range(6)])
        watcher.join(35)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 3 and set(codes) <= {200, 429} and 429 in codes, codes
        for r in responses:
            if r.status_code == 200:  # every admitted request ran to the end
                assert r.json()["usage"]["completion_tokens"] == 400
            else:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        assert peak["slots"] == 2
        assert server.metric('meshlm_requests_total{outcome="rejected"}') == codes.count(429)

        # a crashed engine: the stream in flight ends with an error, /health turns unhealthy, 503s
        outcome = {}

        def stream():
            body = {"model": server.model, "prompt": "x", "max_tokens": 900, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
                outcome["last"] = [line for line in r.iter_lines() if line.startswith("data: ")][-1]

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 10
        while server.metric("meshlm_cache_slots_in_use") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in server.engine_pids():
            os.kill(pid, signal.SIGKILL)
        reader.join(20)
        assert not reader.is_alive(), "the stream hung after its engine died"
        assert json.loads(outcome["last"][6:])["error"]["code"] == "engine_dead"
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        r = _complete(server, "def ")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        code, output = server.stop()
        assert code == 0, output[-2000:]
    finally:
        server.kill()


@pytest.mark.slow
def test_a_hugging_face_model_uses_its_chat_template(run_dir, tmp_path):
    """--init-from-hf: the directory's chat_template renders the messages, and the special
    tokens it writes are encoded as their ids (as transformers' apply_chat_template does)."""
    from meshlm.interop.convert import export_hf

    hf = export_hf(run_dir, tmp_path / "hf")
    config_path = hf / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    server = Server(run_dir, "--served-model-name", "hf-tiny", hf_dir=hf).wait_ready()
    try:
        messages = [{"role": "user", "content": "hi"}]
        rendered = server.post("/tokenize", {"messages": messages}).json()
        text = server.post("/detokenize", {"tokens": rendered["tokens"]}).json()["prompt"]
        assert text == f"<|user|>hi{config['eos_token']}<|assistant|>"
        assert rendered["tokens"].count(0) == 1  # the end-of-text token, by its id
        plain = server.post("/tokenize", {"prompt": text}).json()["tokens"]
        assert 0 not in plain  # a prompt's text is encoded as text
        body = {"model": "hf-tiny", "messages": messages, "max_tokens": 4, "temperature": 0}
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == rendered["count"]
        code, output = server.stop()
        assert code == 0, output[-2000:]
    finally:
        server.kill()
