"""Hugging Face import / export: logits parity against `transformers`, exact round trips, errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from meshlm.artifacts.run_dir import load_run_config  # noqa: E402
from meshlm.artifacts.weights_file import load_weights, save_weights  # noqa: E402
from meshlm.config import Config, ConfigError  # noqa: E402
from meshlm.data.tokenizer import train_tokenizer  # noqa: E402
from meshlm.interop import export_hf, import_hf, load_hf_model, model_config_from_hf  # noqa: E402
from meshlm.model.registry import build_model  # noqa: E402
from meshlm.model.transformer.config import TransformerConfig  # noqa: E402
from meshlm.model.transformer.hf_weights import state_dict_from_hf, state_dict_to_hf  # noqa: E402

TOL = 1e-4
SRC = Path(__file__).resolve().parents[1] / "src" / "meshlm"


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the default init (norm gains around 1, non-zero biases), so a swapped,
    untransposed or mis-split tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        is_norm_gain = p.dim() == 1 and name.endswith("weight")
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_gain else 0.0))


def llama_hf(tmp_path: Path, kv_heads: int, tied: bool, **kw) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1001,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    randomize(model, 1)
    out = tmp_path / "hf"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def gpt2_hf(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1001, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, 2)
    out = tmp_path / "hf"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def max_logit_diff(meshlm_model, hf_model, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = meshlm_model(ids), hf_model(ids).logits
    assert ours.shape == theirs.shape == (2, 16, vocab)
    assert theirs.abs().max() > 0.5  # a meaningful comparison, not two near-zero tensors
    return (ours - theirs).abs().max().item()


LLAMA_CASES = {"gqa-untied": (2, False), "gqa-tied": (2, True), "mha-untied": (4, False), "mha-tied": (4, True)}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_import_matches_transformers_logits(tmp_path, case):
    kv_heads, tied = LLAMA_CASES[case]
    path, hf = llama_hf(tmp_path, kv_heads, tied, rope_theta=50000.0, rms_norm_eps=1e-5)
    cfg, model = load_hf_model(path)
    assert (cfg.arch, cfg.kv_heads, cfg.tied, cfg.vocab_size, cfg.ffn_dim) == ("llama", kv_heads, tied, 1001, 96)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == (50000.0, 1e-5, 64)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert max_logit_diff(model, hf, 1001) <= TOL


def test_gpt2_import_matches_transformers_logits(tmp_path):
    path, hf = gpt2_hf(tmp_path)
    cfg, model = load_hf_model(path)
    assert (cfg.arch, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.ffn_dim, cfg.max_seq_len) == (
        "gpt2",
        64,
        2,
        4,
        1001,
        256,
        64,
    )
    assert max_logit_diff(model, hf, 1001) <= TOL


def test_sharded_checkpoint_imports(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1001,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    randomize(hf, 4)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    cfg, model = load_hf_model(tmp_path / "hf")
    assert max_logit_diff(model, hf, 1001) <= TOL


def test_gpt2_legacy_bin_without_prefix_and_with_mask_buffers(tmp_path):
    """Old GPT-2 checkpoints: pytorch_model.bin, keys without `transformer.`, attention mask buffers."""
    path, hf = gpt2_hf(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (path / "model.safetensors").unlink()
    torch.save({k: v.to(torch.float16) for k, v in legacy.items()}, path / "pytorch_model.bin")
    cfg, model = load_hf_model(path)
    assert model.tok_embeddings.weight.dtype == torch.float32
    # float16 storage rounds the weights; compare against the HF model holding the same rounded weights.
    hf_rounded = transformers.GPT2LMHeadModel(hf.config).eval()
    hf_rounded.load_state_dict({k: v.to(torch.float16).float() for k, v in hf.state_dict().items()})
    assert max_logit_diff(model, hf_rounded, 1001) <= TOL


def test_missing_weights_is_a_clear_error(tmp_path):
    path, _ = gpt2_hf(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights found.*model.safetensors.*pytorch_model.bin"):
        load_hf_model(path)


def test_wrong_shapes_and_missing_tensors_are_named(tmp_path):
    path, _ = llama_hf(tmp_path, 2, False)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        load_hf_model(path)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "model.norm.weight" in str(e.value)


# ----------------------------------------------------------------------------- round trips


MESHLM_VARIANTS = {
    "llama-gqa-untied": TransformerConfig(
        arch="llama",
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=1001,
        ffn_hidden=96,
        max_seq_len=32,
        rope_theta=20000.0,
    ),
    "llama-tied": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, vocab_size=1001, max_seq_len=32, tie_embeddings=True
    ),
    "gpt2": TransformerConfig(arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=1001, max_seq_len=32),
}


def meshlm_run(tmp_path: Path, cfg: TransformerConfig, tokenizer: bool = True) -> tuple[Path, torch.nn.Module]:
    run = tmp_path / "run"
    run.mkdir()
    model = build_model(cfg, seed=0)
    randomize(model, 5)
    config = Config(model=cfg)
    config.data.seq_len = 32
    (run / "config.toml").write_text(config.to_toml())
    save_weights(model.state_dict(), cfg, run / "model.safetensors")
    if tokenizer:
        texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
        train_tokenizer(texts, 300, run / "tokenizer.json")
    return run, model.eval()


@pytest.mark.parametrize("variant", list(MESHLM_VARIANTS))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, variant):
    cfg = MESHLM_VARIANTS[variant]
    run, model = meshlm_run(tmp_path, cfg)
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM" if cfg.arch == "llama" else "GPT2LMHeadModel"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not cfg.tied)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == config["architectures"][0]
    assert max_logit_diff(model, hf.eval(), cfg.vocab_size) <= TOL

    tok = transformers.AutoTokenizer.from_pretrained(out)
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(run / "tokenizer.json"))
    text = "def add(x, y):\n    return x + y\n"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 == hf.config.eos_token_id


@pytest.mark.parametrize("variant", list(MESHLM_VARIANTS))
def test_round_trip_meshlm_hf_meshlm_is_exact(tmp_path, variant):
    cfg = MESHLM_VARIANTS[variant]
    run, model = meshlm_run(tmp_path, cfg, tokenizer=False)
    with pytest.warns(UserWarning, match="tokenizer"):
        out = export_hf(run, tmp_path / "hf")
    cfg2, model2 = load_hf_model(out)
    for key in (
        "arch",
        "d_model",
        "n_layers",
        "n_heads",
        "kv_heads",
        "vocab_size",
        "ffn_dim",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
        "tied",
    ):
        assert getattr(cfg2, key) == getattr(cfg, key), key
    a, b = model.state_dict(), model2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_hf_meshlm_hf_is_exact(tmp_path):
    path, _ = gpt2_hf(tmp_path)
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))  # any file: copied, not parsed on import
    run = import_hf(path, tmp_path / "run")
    assert (run / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    out = export_hf(run, tmp_path / "hf2")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    for k in original:
        assert torch.equal(original[k], exported[k]), k


def test_import_writes_a_valid_run_directory(tmp_path):
    path, hf = llama_hf(tmp_path, 2, True)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        run = import_hf(path, tmp_path / "run")
    cfg = load_run_config(run)
    assert cfg.model.vocab_size == 1001 and cfg.model.tie_embeddings and cfg.data.seq_len <= cfg.model.max_seq_len
    model = load_weights(run / "model.safetensors", cfg.model).eval()
    assert max_logit_diff(model, hf, 1001) <= TOL
    assert not (run / "tokenizer.json").exists()
    with pytest.raises(ConfigError, match="already holds a meshlm run.*overwrite"):
        import_hf(path, run)
    (run / "metrics.jsonl").write_text("{}\n")  # from an earlier run in the same directory
    with pytest.warns(UserWarning):
        import_hf(path, run, overwrite=True)
    assert not (run / "metrics.jsonl").exists() and (run / "model.safetensors").is_file()


def test_export_keeps_exactly_vocab_size_rows(tmp_path):
    cfg = MESHLM_VARIANTS["llama-gqa-untied"]
    state = build_model(cfg, seed=0).state_dict()
    padded = dict(state)
    for k in ("tok_embeddings.weight", "output.weight"):
        padded[k] = torch.cat([state[k], torch.zeros(7, cfg.d_model)])
    hf = state_dict_to_hf(padded, cfg)
    assert hf["model.embed_tokens.weight"].shape[0] == hf["lm_head.weight"].shape[0] == cfg.vocab_size
    back = state_dict_from_hf(hf, cfg)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_export_refuses_to_overwrite_and_step_is_not_yet_supported(tmp_path):
    run, _ = meshlm_run(tmp_path, MESHLM_VARIANTS["gpt2"])
    with pytest.raises(ConfigError, match="sharded checkpoints arrive with the checkpoint feature"):
        export_hf(run, tmp_path / "hf", step=100)
    export_hf(run, tmp_path / "hf")
    with pytest.raises(ConfigError, match="overwrite"):
        export_hf(run, tmp_path / "hf")
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    export_hf(run, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "model-00001-of-00002.safetensors").exists()


# ----------------------------------------------------------------------------- config errors


def hf_dict(arch: str, **extra) -> dict:
    base = {
        "architectures": [arch],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "vocab_size": 1001,
        "max_position_embeddings": 64,
    }
    return {**base, **extra}


def test_unsupported_architecture_is_named():
    with pytest.raises(ConfigError) as e:
        model_config_from_hf(hf_dict("FalconForCausalLM"))
    msg = str(e.value)
    assert "FalconForCausalLM" in msg and "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg


def test_sliding_window_is_named():
    with pytest.raises(ConfigError, match="'sliding_window' is 16"):
        model_config_from_hf(hf_dict("MistralForCausalLM", sliding_window=16))
    # A window at least as long as the context changes nothing: accepted.
    assert (
        model_config_from_hf(hf_dict("MistralForCausalLM", sliding_window=64, num_key_value_heads=2)).max_seq_len == 64
    )
    mistral = model_config_from_hf(hf_dict("MistralForCausalLM", sliding_window=None, num_attention_heads=16))
    assert mistral.kv_heads == 8  # the Mistral default when config.json leaves the key out


@pytest.mark.parametrize(
    "arch,extra,named",
    [
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
        ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}, "'attention_bias'.*'mlp_bias'"),
        ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
        ("LlamaForCausalLM", {"head_dim": 32}, "head_dim"),
        ("Qwen2ForCausalLM", {}, "biases"),
        (
            "GPT2LMHeadModel",
            {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
            "scale_attn_by_inverse_layer_idx.*reorder_and_upcast_attn",
        ),
        ("GPT2LMHeadModel", {"activation_function": "relu"}, "activation_function"),
    ],
)
def test_unsupported_features_are_named(arch, extra, named):
    with pytest.raises(ConfigError, match=named):
        model_config_from_hf(hf_dict(arch, **extra))


def test_config_key_spellings_and_defaults():
    v4 = model_config_from_hf(hf_dict("LlamaForCausalLM", rope_theta=5e5, rope_scaling=None, num_key_value_heads=2))
    v5 = model_config_from_hf(
        hf_dict("LlamaForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 5e5}, num_key_value_heads=2)
    )
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.kv_heads == 2
    gpt2 = model_config_from_hf({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 2})
    assert (gpt2.ffn_dim, gpt2.max_seq_len, gpt2.vocab_size, gpt2.norm_eps) == (256, 1024, 50257, 1e-5)


def test_no_transformers_import_under_src():
    pattern = re.compile(r"^\s*(import|from)\s+transformers\b|import_module\(\s*['\"]transformers", re.M)
    offenders = [str(p) for p in SRC.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders


def test_tokenizer_without_end_of_text_converts_and_generates(tmp_path, capsys):
    """Separating documents is data preparation's need: generation works with any tokenizer and
    then stops at the length (or a stop string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from meshlm.cli import main
    from meshlm.data.tokenizer import end_of_text_id, load_tokenizer

    path, _ = llama_hf(tmp_path, 2, False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    assert end_of_text_id(load_tokenizer(path / "tokenizer.json")) is None

    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    capsys.readouterr()
    argv = ["--prompt", "def ", "--max-new-tokens", "7", "--temperature", "0"]
    assert main(["generate", "--run", str(tmp_path / "run"), *argv]) == 0
    assert main(["generate", "--init-from-hf", str(path), *argv]) == 0
    out = capsys.readouterr().out
    assert out.count("def ") >= 2 and "error" not in out
