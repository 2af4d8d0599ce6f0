"""The Hugging Face `transformers` twin of a meshlm model (same shapes, same weights), for
side-by-side benchmarks. transformers is a benchmark/test dependency only."""

from __future__ import annotations

from meshlm.model.transformer.config import TransformerConfig
from meshlm.model.transformer.hf_config import hf_config_from_model
from meshlm.model.transformer.hf_weights import state_dict_to_hf

# The shapes both benchmarks compare on.
SHAPES = {
    "llama": TransformerConfig(
        arch="llama",
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=4096,
        max_seq_len=256,
        tie_embeddings=False,
    ),
    "gpt2": TransformerConfig(arch="gpt2", d_model=256, n_layers=4, n_heads=8, vocab_size=4096, max_seq_len=256),
}


def hf_model(cfg: TransformerConfig, meshlm_model):
    import transformers

    hf_cfg = hf_config_from_model(cfg)
    arch = hf_cfg["architectures"][0]
    config_cls = transformers.LlamaConfig if arch == "LlamaForCausalLM" else transformers.GPT2Config
    config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    config._attn_implementation = "sdpa"
    model = getattr(transformers, arch)(config)
    missing, unexpected = model.load_state_dict(state_dict_to_hf(meshlm_model.state_dict(), cfg), strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model
