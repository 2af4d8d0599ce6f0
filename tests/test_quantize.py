"""Int8 decoding (inference/quantize): the int8 linear layers against the float ones, the engine
with int8 weights against the float engine (single process and tensor-parallel shards), and
`--quantize int8` on the commands. Tiny random models, float32, CPU.

Int8 is not exact: the tolerances are the quantisation's (each weight within half a step of
its row's scale, activations likewise on the fbgemm path), and would catch a wrong scale, a
transposed weight or a lost bias (errors of order 1, not 1e-2).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
from family_cases import FAMILY_CASES
from torch import nn

from meshlm.cli import main as cli_main
from meshlm.config import ConfigError, load_config
from meshlm.distributed.spawn import run_distributed
from meshlm.inference.engine import Engine, Request
from meshlm.inference.evaluate import evaluate_tokens
from meshlm.inference.linear_ops import swappable_linear
from meshlm.inference.quantize import DynamicInt8Linear, Int8Linear, check_quantizable, quantize_linears
from meshlm.inference.sampling import SamplingParams
from meshlm.model.maxent.config import MaxEntConfig
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig

V = 384
CONFIGS = {
    "llama": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=128, init_std=0.1
    ),
    "gpt2": TransformerConfig(
        arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=128, init_std=0.1
    ),
}
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=())


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated tokens equal up to each sequence's first difference."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / total


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", [DynamicInt8Linear, Int8Linear])
def test_int8_linear_is_the_float_linear_within_quantisation_error(kind):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    with torch.no_grad():
        linear.weight[3].zero_()  # an all-zero row stays exactly zero (no 0/0 scale)
        linear.bias[3] = 0.0
    x = torch.randn(3, 5, 96)
    quantized = kind(linear)
    ref, y = linear(x).detach(), quantized(x)
    assert y.shape == ref.shape == (3, 5, 200)
    assert 0 < relative_error(y, ref) < 0.02
    assert (y[..., 3] == 0).all()
    if kind is Int8Linear:
        assert quantized.qweight.dtype == torch.int8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_engine_and_eval_track_the_float_model(arch):
    cfg = CONFIGS[arch]
    model = build_model(cfg, seed=0).eval()
    requests = [Request(p, GREEDY) for p in prompts_of((4, 13, 7, 20))]
    reference = [c.token_ids for c in Engine(model, max_batch=4).generate(requests)]
    engine = Engine(model, max_batch=4, quantize="int8")
    swapped = [m for m in engine.decoder.model.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(swapped) == 4 * cfg.n_layers + 1  # per block: fused qkv, output, MLP in and out; the head
    quantized = [c.token_ids for c in engine.generate(requests)]
    assert agreement(quantized, reference) >= 0.75
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for p in model.parameters())

    # full-sequence forward (what eval runs): logits and loss close to the float model's
    tokens = torch.randint(0, V, (32 * 6 + 1,), generator=torch.Generator().manual_seed(1))
    copied = copy.deepcopy(model)
    assert quantize_linears(copied) > 0
    x = tokens[None, :64]
    with torch.no_grad():
        assert relative_error(copied(x), model(x)) < 0.1
    one = evaluate_tokens(model, tokens, seq_len=32)
    q = evaluate_tokens(copied, tokens, seq_len=32)
    assert q.loss == pytest.approx(one.loss, rel=0.01)


def prefill_logits(engine: Engine, prompts: list[list[int]], group=None) -> torch.Tensor:
    state = engine.decoder.new_state(len(prompts), 64)
    with torch.no_grad():
        logits = state.prefill(prompts, list(range(len(prompts))))  # (n, V_local)
    if group is not None and logits.shape[-1] < V:  # a vocabulary-parallel head: each rank holds a slice
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[:, :V] if group is not None else logits


def _tp_case(rank: int, arch: str) -> list:
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel

    shard = build_model(CONFIGS[arch], seed=0).eval()
    apply_tensor_parallel(shard, dist.group.WORLD)
    engine = Engine(shard, max_batch=2, tp_group=dist.group.WORLD, quantize="int8")
    assert any(isinstance(m, DynamicInt8Linear) and m.group is not None for m in engine.decoder.model.modules())
    return prefill_logits(
        engine, prompts_of((4, 13, 7)), dist.group.WORLD
    ).tolist()  # (a tensor would outlive its rank)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_on_tensor_parallel_shards_tracks_the_float_model(arch):
    """Shards quantise per shard (a row-parallel shard's scales cover its half of each row), so
    int8 on tp2 is close to, not equal to, int8 in one process: both are held to the float
    model's logits with the same tolerance."""
    model = build_model(CONFIGS[arch], seed=0).eval()
    prompts = prompts_of((4, 13, 7))
    reference = prefill_logits(Engine(model, max_batch=4), prompts)
    one = prefill_logits(Engine(model, max_batch=4, quantize="int8"), prompts)
    assert 0 < relative_error(one, reference) < 0.1
    for logits in map(torch.tensor, run_distributed(_tp_case, 2, arch)):
        assert logits.shape == reference.shape
        assert 0 < relative_error(logits, reference) < 0.1


def test_quantize_refuses_unknown_modes_and_families_without_linears():
    with pytest.raises(ConfigError, match="int4"):
        check_quantizable(CONFIGS["llama"], "int4")
    with pytest.raises(ConfigError, match="no linear layers"):
        check_quantizable(MaxEntConfig(family="maxent", vocab_size=V), "int8")
    check_quantizable(MaxEntConfig(family="maxent", vocab_size=V), "none")
    with pytest.raises(ConfigError, match="no linear layers"):
        quantize_linears(build_model(MaxEntConfig(family="maxent", vocab_size=V), seed=0), "int8")


def test_quantize_option_on_eval_and_generate(tmp_path, capsys):
    from meshlm.artifacts.weights_file import save_weights
    from meshlm.config import Config
    from meshlm.data.tokenizer import train_tokenizer

    cfg = CONFIGS["llama"]
    run = tmp_path / "run"
    run.mkdir()
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, run / "model.safetensors")
    (run / "config.toml").write_text(Config(model=cfg).to_toml())
    text = "def f(x):\n    return x + 1\n" * 200
    train_tokenizer([text], V, run / "tokenizer.json")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    losses = {}
    for mode in ("none", "int8"):
        args = ["eval", "--run", str(run), "--data", str(corpus), "--seq-len", "64", "--json", "--quantize", mode]
        assert cli_main(args) == 0
        losses[mode] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.01) and losses["int8"] != losses["none"]
    args = ["generate", "--run", str(run), "--prompt", "def f", "--max-new-tokens", "8", "--temperature", "0"]
    assert cli_main([*args, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli_main([*args, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_every_family_with_linear_layers_decodes_in_int8(family):
    """Every registered family: int8 prefill logits within the quantisation error of the float
    engine's, or (no linear layers) refused by name before any model is loaded."""
    cfg = load_config(None, [*FAMILY_CASES[family], "model.vocab_size=301", "model.max_seq_len=128"]).model
    model = build_model(cfg, seed=0).eval()
    if not any(swappable_linear(m) for m in model.modules()):
        with pytest.raises(ConfigError, match="no linear layers"):
            check_quantizable(cfg, "int8")
        return
    check_quantizable(cfg, "int8")
    prompts = [list(range(1, 14)), list(range(40, 47))]
    reference = prefill_logits(Engine(model, max_batch=2), prompts)
    quantized = prefill_logits(Engine(model, max_batch=2, quantize="int8"), prompts)
    assert 0 < relative_error(quantized, reference) < 0.1


def test_serve_quantize_int8_answers_as_generate_does(tmp_path, capsys):
    """`meshlm serve --quantize int8`: the engine workers decode in int8, token for token what
    `meshlm generate --quantize int8` prints (the same engine and weights, greedy)."""
    from serve_fixtures import Server, make_run

    run = make_run(tmp_path / "run", max_seq_len=128)
    prompt = "def f(x):"
    args = ["generate", "--run", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]
    assert cli_main([*args, "--quantize", "int8"]) == 0
    int8_text = capsys.readouterr().out
    server = Server(run, "--max-batch", "2", "--quantize", "int8").wait_ready()
    try:
        body = {"model": run.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        answer = server.post("/v1/completions", body).json()["choices"][0]["text"]
    finally:
        server.kill()
    assert prompt + answer + "\n" == int8_text


def test_python_api_passes_quantize_through(tmp_path):
    from serve_fixtures import make_run

    import meshlm.api as api

    lm = api.load(make_run(tmp_path / "run", max_seq_len=128))
    texts = ["def f(x):\n    return x + 1\n" * 20]
    plain, int8 = lm.evaluate(texts, seq_len=64), lm.evaluate(texts, seq_len=64, quantize="int8")
    assert int8["loss"] == pytest.approx(plain["loss"], rel=0.01) and int8["loss"] != plain["loss"]
    assert len(lm.predict(["def f"], max_new_tokens=4, quantize="int8")) == 1
