"""The engine's online interface (add / abort / step), what the server runs: requests that
arrive mid-run and requests aborted mid-run leave every other request's tokens unchanged,
and an abort frees its slot at once. In process, tiny random model, float32."""

from __future__ import annotations

import pytest
import torch

from meshlm.inference.engine import Engine, Request
from meshlm.inference.sampling import SamplingParams
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig

V = 384
CFG = TransformerConfig(arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=128)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def test_arrivals_and_aborts_mid_run_leave_other_requests_unchanged():
    model = build_model(CFG, seed=0).eval()
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=())
    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=())
    penalised = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.5, stop_token_ids=())
    requests = [Request(p, sp) for p, sp in zip(_prompts((5, 11, 3, 8)), (greedy, sampled, penalised, greedy))]
    alone = [Engine(model, max_batch=1).generate([r])[0].token_ids for r in requests]

    engine = Engine(model, max_batch=3)
    engine.reserve()
    tokens: dict[int, list[int]] = {}
    done: dict[int, str] = {}
    first = engine.add(requests[0])
    doomed = engine.add(Request(_prompts((6,), seed=9)[0], greedy))
    for step in range(200):
        if step == 3:  # arrivals while others decode (one with the repetition penalty)
            late = [engine.add(r) for r in requests[1:]]
            assert engine.num_waiting == 3 and engine.num_running == 2  # admitted at the next step
        if step == 4:
            assert engine.num_waiting == 2 and engine.num_running == 3  # 3 slots: the one free slot taken
        if step == 5:
            assert engine.abort(doomed) and engine.num_running == 2  # freed before the next step
            assert not engine.abort(doomed)
        for e in engine.step():
            assert e.index != doomed or step < 5
            tokens.setdefault(e.index, []).append(e.token_id)
            if e.completion is not None:
                done[e.index] = e.completion.finish_reason
        if not engine.has_work:
            break
    assert not engine.has_work and engine.num_running == engine.num_waiting == 0
    ids = [first, *late]
    assert [tokens[i] for i in ids] == alone  # token for token, whatever shared the batch
    assert all(done[i] == "length" for i in ids) and doomed not in done


def test_logprobs_of_the_sampled_tokens():
    model = build_model(CFG, seed=0).eval()
    engine = Engine(model, max_batch=2)
    prompt = _prompts((7,))[0]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=())
    events = [e for e in engine.stream([Request(prompt, params, logprobs=3), Request(prompt, params)])]
    mine = [e for e in events if e.index == 0]
    assert all(e.logprobs is None for e in events if e.index == 1)
    seq = list(prompt)
    with torch.no_grad():
        for e in mine:
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1], dim=-1)
            assert abs(e.logprobs.logprob - logp[e.token_id].item()) < 1e-4
            assert [t for t, _ in e.logprobs.top] == torch.topk(logp, 3).indices.tolist()
            assert e.logprobs.top[0][0] == e.token_id  # greedy: the best one
            seq.append(e.token_id)
    # a stream left early leaves nothing behind in the engine
    for _ in engine.stream([Request(prompt, params), Request(prompt, params)]):
        break
    assert not engine.has_work


def test_chat_templates(tmp_path):
    """The default template, and a Hugging Face directory's own chat_template (Jinja2, with
    bos_token and a template that raises on a bad role)."""
    import json

    from meshlm.serve.chat_template import ChatTemplate, hf_chat_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ChatTemplate().render(messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert ChatTemplate().render(messages, add_generation_prompt=False) == "System: Be brief.\nUser: Hi\n"
    assert hf_chat_template(tmp_path) is None  # no template: the caller uses the default
    source = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = {"chat_template": source, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = hf_chat_template(tmp_path)
    assert template.render(messages) == "<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>"
    with pytest.raises(ValueError, match="bad role tool"):  # the template's own error, as a 400 later
        template.render([{"role": "tool", "content": "x"}])
