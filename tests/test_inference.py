"""The inference side: the engine over the family's decode state against full recompute, batching,
sampling, stop strings, tensor-parallel generation, `meshlm generate / predict / eval` (data
parallel, resumable). Every family's decode state itself: tests/test_decode_state.py.

Tiny random models (float32, CPU). Greedy comparisons are token for token; logits 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from meshlm.artifacts.weights_file import save_weights
from meshlm.cli import main as cli_main
from meshlm.config import Config
from meshlm.data.tokenizer import train_tokenizer
from meshlm.distributed.spawn import run_distributed
from meshlm.inference.engine import Engine, Request
from meshlm.inference.evaluate import evaluate_tokens
from meshlm.inference.sampling import SamplingParams
from meshlm.inference.simple_generate import generate_tokens
from meshlm.model.registry import build_model, family_spec
from meshlm.model.transformer.config import TransformerConfig

V = 384
CONFIGS = {
    "llama": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=128
    ),
    "gpt2": TransformerConfig(arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=128),
}
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=())


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def corpus_text() -> str:
    import inspect
    import json as json_module
    import textwrap

    return inspect.getsource(json_module.decoder) + inspect.getsource(textwrap)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (config.toml, model.safetensors, tokenizer.json) of a tiny llama."""
    out = tmp_path_factory.mktemp("run")
    cfg = CONFIGS["llama"]
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, out / "model.safetensors")
    (out / "config.toml").write_text(Config(model=cfg).to_toml())
    train_tokenizer([corpus_text()], V, out / "tokenizer.json")
    return out


# ----------------------------------------------------------------------------- engine


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_step_flops_are_the_spec_flops_per_token(arch):
    """A decode step costs exactly the family's FLOPs per token at its sequence length (every
    weight once, attention over the cached keys): the cache is incremental, and the planner's
    and MFU's FLOPs describe what decoding does. (Cached decode against full recomputation, for
    every family: tests/test_decode_state.py.)"""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = CONFIGS[arch]
    model = build_model(cfg, seed=0).eval()
    spec = family_spec(cfg)
    state = spec.decode_state(model, max_batch=1, max_len=128)
    seq = prompts_of((101,))[0]
    for position in (8, 100):
        state.prefill([seq[state.lengths[0] : position]], [0])  # the sequence cached up to `position`
        with FlopCounterMode(display=False) as counter:
            state.decode(torch.tensor([seq[position]]))
        assert counter.get_total_flops() == spec.flops_per_token(cfg, position + 1, False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_prompts_of_different_lengths_equal_each_alone(arch):
    """Seven requests through 3 slots (continuous batching: finished sequences are replaced
    mid-run) give the tokens each request gives alone, greedy and sampled; greedy also
    equals the full-recompute reference loop."""
    model = build_model(CONFIGS[arch], seed=0).eval()
    prompts = prompts_of((3, 17, 1, 9, 30, 5, 12))
    params = [
        GREEDY,
        SamplingParams(max_new_tokens=7, temperature=0.0, stop_token_ids=()),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=5, stop_token_ids=()),
        GREEDY,
        SamplingParams(max_new_tokens=3, temperature=0.7, seed=1, repetition_penalty=1.3, stop_token_ids=()),
        SamplingParams(max_new_tokens=0),
        GREEDY,
    ]
    requests = [Request(p, sp) for p, sp in zip(prompts, params)]
    batched = Engine(model, max_batch=3).generate(requests)
    alone = Engine(model, max_batch=1)
    for r, got in zip(requests, batched):
        assert got.token_ids == alone.generate([r])[0].token_ids
        assert got.completion_tokens == r.params.max_new_tokens
        assert got.finish_reason == "length" and got.prompt_tokens == len(r.prompt_ids)
        if r.params.greedy and r.params.max_new_tokens:
            ref = list(generate_tokens(model, r.prompt_ids, r.params.max_new_tokens, temperature=0))
            assert got.token_ids == ref


def test_sampling_is_deterministic_per_seed():
    model = build_model(CONFIGS["llama"], seed=0).eval()
    engine = Engine(model, max_batch=4)
    prompt = prompts_of((6,))[0]

    def run(max_new_tokens=20, **kw):
        sp = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(), **kw)
        return engine.generate([Request(prompt, sp)])[0].token_ids

    a, b, c = (
        c.token_ids
        for c in engine.generate(
            [
                Request(prompt, SamplingParams(max_new_tokens=20, temperature=1.5, seed=s, stop_token_ids=()))
                for s in (7, 7, 8)
            ]
        )
    )
    assert a == b and a != c  # same seed -> same tokens, even side by side in one batch
    greedy = run(temperature=0.0)
    assert run(temperature=1.0, top_k=1, seed=3) == greedy  # top-k 1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy  # so is a tiny nucleus
    long_greedy = run(temperature=0.0, max_new_tokens=60)
    assert len(set(long_greedy)) < 60  # the random model repeats itself ...
    penalised = run(temperature=0.0, repetition_penalty=1e6, max_new_tokens=60)
    assert len(set(penalised)) == 60 and not set(penalised) & set(prompt)  # ... but not under a huge penalty
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_stop_strings_stop_tokens_and_streaming(run_dir):
    from meshlm.inference.loading import find_model_files, load_model

    loaded = load_model(find_model_files(run=run_dir))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=4)
    prompt = loaded.tokenizer.encode("def decode(self, s):").ids
    free = engine.generate([Request(prompt, SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=()))])[0]
    text = free.text
    assert len(text) > 20 and loaded.tokenizer.decode(free.token_ids) == text
    stop = text[12:15]
    cut = text[: text.index(stop)]
    events = list(
        engine.stream([Request(prompt, SamplingParams(max_new_tokens=40, temperature=0.0, stop=(stop, "\x00")))])
    )
    done = events[-1].completion
    assert done.text == cut and done.finish_reason == "stop"
    assert "".join(e.text for e in events) == cut  # the stream never shows the stop string
    assert sum(e.completion is not None for e in events) == 1
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    by_token = engine.generate(
        [Request(prompt, SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=(stop_id,)))]
    )[0]
    assert by_token.token_ids == free.token_ids[: first + 1] and by_token.finish_reason == "stop"
    assert by_token.text == loaded.tokenizer.decode(free.token_ids[:first])


def test_context_limit_and_bad_prompts():
    model = build_model(CONFIGS["gpt2"], seed=0).eval()
    engine = Engine(model, max_batch=2)
    out = engine.generate(
        [Request(prompts_of((120,))[0], SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=()))]
    )[0]
    assert out.completion_tokens == 128 - 120 + 1 and out.finish_reason == "length"  # the context is full
    with pytest.raises(ValueError, match="at most 127"):
        engine.check(Request(prompts_of((128,))[0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.check(Request([V]))


# ----------------------------------------------------------------------------- tensor parallel


def _tp_case(rank: int, arch: str) -> tuple[list, list]:
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel

    cfg = CONFIGS[arch]
    requests = [Request(p, GREEDY) for p in prompts_of((4, 13, 7))]
    requests.append(
        Request(
            prompts_of((9,))[0],
            SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=2, stop_token_ids=()),
        )
    )
    reference = [c.token_ids for c in Engine(build_model(cfg, seed=0).eval(), max_batch=4).generate(requests)]
    shard = build_model(cfg, seed=0).eval()
    apply_tensor_parallel(shard, dist.group.WORLD)
    tp_tokens = [c.token_ids for c in Engine(shard, max_batch=2, tp_group=dist.group.WORLD).generate(requests)]
    return reference, tp_tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tensor_parallel_greedy_equals_single_process(arch):
    """The engine on tp2 shards (the decode state's gathered logits against the single process:
    tests/test_decode_state.py)."""
    for reference, tp_tokens in run_distributed(_tp_case, 2, arch):
        assert tp_tokens == reference  # token for token, on every rank


# ----------------------------------------------------------------------------- evaluation


def _eval_case(rank: int, tokens: torch.Tensor):
    model = build_model(CONFIGS["gpt2"], seed=0).eval()
    return evaluate_tokens(model, tokens, seq_len=32, batch_size=3, rank=rank, world=dist.get_world_size())


def test_eval_is_the_same_for_every_number_of_processes():
    tokens = torch.randint(0, V, (32 * 13 + 7,), generator=torch.Generator().manual_seed(0))
    one = evaluate_tokens(build_model(CONFIGS["gpt2"], seed=0).eval(), tokens, seq_len=32, batch_size=3)
    two = run_distributed(_eval_case, 2, tokens)
    for r in two:
        assert r.loss == pytest.approx(one.loss, rel=1e-6) and r.tokens == one.tokens == len(tokens) - 1
    assert one.windows == 14
    # the definition: the mean next-token loss over the windows, computed one window at a time
    model = build_model(CONFIGS["gpt2"], seed=0).eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 32):
            w = tokens[start : start + 33]
            total += torch.nn.functional.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum").item()
    assert one.loss == pytest.approx(total / (len(tokens) - 1), rel=1e-6)


def test_eval_command(run_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text()[:4000])
    assert cli_main(["eval", "--run", str(run_dir), "--data", str(corpus), "--seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seq_len"] == 64 and result["tokens"] > 100
    assert abs(result["loss"] - torch.log(torch.tensor(float(V))).item()) < 0.5  # an untrained model: ~log V


# ----------------------------------------------------------------------------- CLI


def _write_input(path: Path) -> None:
    lines = [
        json.dumps({"prompt": "def f(x):", "max_new_tokens": 12, "id": "a"}),
        json.dumps({"prompt": "class A:", "temperature": 1.0, "top_k": 20, "max_new_tokens": 9}),
        "{not json",
        "",
        json.dumps({"prompt": "import os", "stop": ["\n"], "max_new_tokens": 20, "temperature": 0.8, "seed": 4}),
        json.dumps({"prompt": "x", "temprature": 0.5}),
        json.dumps({"prompt": "return", "max_new_tokens": 5, "temperature": 1.2}),
        json.dumps({"prompt": "for i in", "max_new_tokens": 0}),
    ]
    path.write_text("\n".join(lines) + "\n")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_reports_bad_lines_and_resumes(run_dir, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src)
    args = [
        "predict",
        "--run",
        str(run_dir),
        "--input",
        str(src),
        "--output",
        str(out),
        "--seed",
        "1",
        "--no-progress",
        "--max-new-tokens",
        "8",
    ]
    assert cli_main(args) == 0
    first = _records(out)
    assert [r["line"] for r in first] == [1, 2, 3, 5, 6, 7, 8]  # input order, the blank line skipped
    errors = {r["line"]: r["error"] for r in first if "error" in r}
    assert set(errors) == {3, 6}
    assert errors[3].startswith("line 3: not valid JSON") and "temprature" in errors[6]
    answered = {r["line"]: r for r in first if "error" not in r}
    assert answered[1]["id"] == "a" and answered[1]["completion_tokens"] <= 12
    assert answered[7]["completion_tokens"] <= 5 and answered[8]["completion_tokens"] == 0
    assert "\n" not in answered[5]["text"]
    for r in answered.values():
        assert {"prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason"} <= set(r)
        assert r["finish_reason"] in ("stop", "length")
    assert "5 answered, 0 already" in capsys.readouterr().err
    # interrupted run: the last two answers lost, a torn line at the end
    kept = [line for line in out.read_text().splitlines() if json.loads(line)["line"] not in (7, 8)]
    out.write_text("\n".join(kept) + '\n{"line": 7, "te')
    assert cli_main(args) == 0
    assert _records(out) == first  # same answers, in input order
    assert "2 answered, 3 already" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
    # CPU ranks (gloo) even on a GPU machine: two NCCL ranks cannot share one GPU.
    env = {**os.environ, "MESHLM_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True, timeout=300, env=env)


def test_predict_nproc_2_equals_nproc_1_and_tp(run_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    _write_input(src)
    outs = {}
    for name, extra in (("n1", []), ("n2", ["--nproc", "2"]), ("tp2", ["--nproc", "2", "--tp", "2"])):
        outs[name] = tmp_path / f"{name}.jsonl"
        proc = _cli(
            "predict",
            "--run",
            str(run_dir),
            "--input",
            str(src),
            "--output",
            str(outs[name]),
            "--seed",
            "1",
            "--no-progress",
            "--max-new-tokens",
            "8",
            *extra,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(outs["n2"]) == _records(outs["n1"])
    # tensor parallel: greedy lines token for token; sampled lines may part after a near-tie
    tp, one = _records(outs["tp2"]), _records(outs["n1"])
    assert [r["line"] for r in tp] == [r["line"] for r in one]
    assert tp[0] == one[0] and tp[-1] == one[-1]  # the greedy lines


def test_generate_streams_several_prompts_in_order(run_dir, capsys):
    from meshlm.inference.loading import find_model_files, load_model

    args = [
        "generate",
        "--run",
        str(run_dir),
        "--prompt",
        "def ",
        "--prompt",
        "import sys\n",
        "--prompt",
        "x",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--max-batch",
        "2",
    ]
    assert cli_main(args) == 0
    shown = capsys.readouterr().out
    loaded = load_model(find_model_files(run=run_dir))
    engine = Engine(loaded.model, loaded.tokenizer)
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=())
    texts = [
        p + c.text
        for p, c in zip(
            ["def ", "import sys\n", "x"],
            engine.generate([Request(loaded.tokenizer.encode(p).ids, sp) for p in ["def ", "import sys\n", "x"]]),
        )
    ]
    assert shown == "\n\n".join(texts) + "\n"


def test_commands_fail_clearly(run_dir, tmp_path, capsys):
    assert (
        cli_main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--input",
                str(tmp_path / "none.jsonl"),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "nope.safetensors"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--input",
                str(run_dir / "config.toml"),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--nproc",
                "3",
                "--tp",
                "2",
            ]
        )
        == 2
    )
    assert "multiple of --tp" in capsys.readouterr().err
    assert cli_main(["generate", "--run", str(run_dir), "--prompt", "x", "--tp", "3"]) == 2
    assert "divisible" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    assert cli_main(["generate", "--checkpoint", str(ckpt / "model.safetensors"), "--prompt", "x"]) == 2
    assert "config.toml" in capsys.readouterr().err
    # a checkpoint inside a run directory finds the run's config and tokenizer above it
    nested = tmp_path / "run" / "checkpoints" / "final"
    nested.mkdir(parents=True)
    for name in ("config.toml", "tokenizer.json"):
        (tmp_path / "run" / name).write_bytes((run_dir / name).read_bytes())
    (nested / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    common = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "6"]
    assert cli_main(["generate", "--checkpoint", str(nested / "model.safetensors"), *common]) == 0
    assert cli_main(["generate", "--run", str(run_dir), *common]) == 0
    out = capsys.readouterr().out
    half = len(out) // 2
    assert out[:half] == out[half:] and out.startswith("def ") and len(out) > 2 * len("def \n")  # same weights


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_on_cuda(arch):
    device = torch.device("cuda")
    cpu_model = build_model(CONFIGS[arch], seed=0).eval()
    model = build_model(CONFIGS[arch], device=device, seed=0).eval()
    model.load_state_dict(cpu_model.state_dict())
    requests = [Request(p, GREEDY) for p in prompts_of((3, 17, 1, 9))]
    batched = Engine(model, max_batch=3).generate(requests)  # decode steps replayed from CUDA graphs
    eager = Engine(model, max_batch=3, cuda_graphs=False).generate(requests)
    assert [c.token_ids for c in batched] == [c.token_ids for c in eager]
    for r, got in zip(requests, batched):
        assert got.token_ids == Engine(model, max_batch=1).generate([r])[0].token_ids
        assert got.token_ids == Engine(cpu_model).generate([r])[0].token_ids
    seq = prompts_of((12,))[0]
    state = family_spec(model.cfg).decode_state(model, 1, 32)
    state.prefill([seq[:6]], [0])
    with torch.no_grad():
        for i in range(6, 12):
            logits = state.decode(torch.tensor([seq[i]], device=device))
            ref = model(torch.tensor([seq[: i + 1]], device=device))[0, -1]
            assert (logits[0] - ref).abs().max().item() < 1e-4
    half = build_model(CONFIGS[arch], device=device, seed=0).to(torch.bfloat16).eval()
    out = Engine(half).generate(requests)
    assert [c.completion_tokens for c in out] == [16] * 4
