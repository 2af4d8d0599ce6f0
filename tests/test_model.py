"""The single-device model: shapes, causality, meta-device build, init, counts."""

import pytest
import torch

from meshlm.artifacts.weights_file import load_weights, save_weights
from meshlm.model.loss import lm_loss
from meshlm.model.registry import build_model
from meshlm.model.stats import count_params, flops_per_token
from meshlm.model.transformer.config import TransformerConfig
from meshlm.model.transformer.model import Transformer
from meshlm.model.transformer.stats import matmul_params

VARIANTS = {
    "llama-gqa": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, max_seq_len=32
    ),
    "llama-untied-mha": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32, tie_embeddings=False
    ),
    "gpt2": TransformerConfig(arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32),
}


@pytest.fixture(params=list(VARIANTS))
def cfg(request):
    return VARIANTS[request.param]


def test_shapes_and_param_count(cfg):
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (3, 17))
    assert model(x).shape == (3, 17, cfg.vocab_size)
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == count_params(cfg)
    assert (model.output.weight is model.tok_embeddings.weight) == cfg.tied


def test_causality_future_tokens_never_change_past_logits(cfg):
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_meta_build_then_materialise_matches_eager_init(cfg):
    with torch.device("meta"):
        meta_model = Transformer(cfg)
    assert all(p.is_meta for p in meta_model.parameters())
    materialised = build_model(cfg, seed=3)
    again = build_model(cfg, seed=3)
    for (name, p), (_, q) in zip(materialised.named_parameters(), again.named_parameters()):
        assert not p.is_meta and torch.equal(p, q), name
    assert (materialised.output.weight is materialised.tok_embeddings.weight) == cfg.tied
    if materialised.rope is not None:
        assert torch.equal(materialised.rope.cos, Transformer(cfg).rope.cos)


def test_gpt2_style_init_scales_residual_projections(cfg):
    model = build_model(cfg, seed=0)
    std = cfg.init_std
    big = torch.cat([model.layers[str(i)].attention.wq.weight.flatten() for i in range(cfg.n_layers)])
    res = torch.cat([model.layers[str(i)].attention.wo.weight.flatten() for i in range(cfg.n_layers)])
    assert abs(big.std().item() - std) < 0.1 * std
    assert abs(res.std().item() - std / (2 * cfg.n_layers) ** 0.5) < 0.1 * std


def test_initial_loss_is_near_uniform(cfg):
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (4, 16))
    loss = lm_loss(model(x), torch.randint(0, cfg.vocab_size, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5


def test_weights_file_round_trip(cfg, tmp_path):
    model = build_model(cfg, seed=0)
    save_weights(model.state_dict(), cfg, tmp_path / "model.safetensors")
    loaded = load_weights(tmp_path / "model.safetensors", cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(model(x), loaded(x))
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == cfg.tied


def test_weights_file_rejects_mismatched_config(tmp_path):
    cfg = VARIANTS["gpt2"]
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, tmp_path / "model.safetensors")
    other = TransformerConfig(arch="gpt2", d_model=32, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32)
    with pytest.raises(Exception, match="do not match the model config"):
        load_weights(tmp_path / "model.safetensors", other)


def test_corrupt_weights_file_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="unreadable or corrupt"):
        load_weights(path, VARIANTS["gpt2"])


def test_flops_per_token_is_six_n_plus_attention():
    cfg = VARIANTS["llama-gqa"]
    n = matmul_params(cfg)
    assert flops_per_token(cfg, 16) == 6 * n + 12 * cfg.n_layers * 16 * cfg.d_model
    assert flops_per_token(cfg, 16, training=False) == 2 * n + 4 * cfg.n_layers * 16 * cfg.d_model
