"""Model presets for `meshlm plan --model NAME` (architecture shapes from the papers).

GPT-3 sizes follow Brown et al. 2020, table 2.1 (GPT-2 architecture, 2048 tokens; where the
paper's heads x head size differs from d_model, 1.3B and 13B, the heads are chosen so that
they divide d_model). `megatron-*` are the GPT models of Narayanan et al. 2021, table 1
(vocabulary padded to 51,200). Llama 3 shapes are from Meta's model cards (grouped-query
attention with 8 key/value heads, SwiGLU MLP, 128,256-token vocabulary).
"""

from __future__ import annotations

from meshlm.config import ConfigError, ModelConfig, model_section


def _transformer(**keys) -> ModelConfig:
    """These presets are all decoder-only transformers (the [model] section of that family)."""
    return model_section("transformer")(**keys)


def _gpt(n_layers: int, d: int, heads: int, vocab: int = 50257, seq: int = 2048) -> ModelConfig:
    return _transformer(arch="gpt2", d_model=d, n_layers=n_layers, n_heads=heads, vocab_size=vocab, max_seq_len=seq)


def _llama(n_layers: int, d: int, heads: int, kv: int, ffn: int, vocab: int = 128256, seq: int = 8192) -> ModelConfig:
    return _transformer(
        arch="llama",
        d_model=d,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_hidden=ffn,
        vocab_size=vocab,
        max_seq_len=seq,
        rope_theta=500000.0,
    )


MODELS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt(12, 768, 12, seq=1024),
    "gpt3-125m": _gpt(12, 768, 12),
    "gpt3-350m": _gpt(24, 1024, 16),
    "gpt3-760m": _gpt(24, 1536, 16),
    "gpt3-1.3b": _gpt(24, 2048, 16),
    "gpt3-2.7b": _gpt(32, 2560, 32),
    "gpt3-6.7b": _gpt(32, 4096, 32),
    "gpt3-13b": _gpt(40, 5120, 40),
    "gpt3-175b": _gpt(96, 12288, 96),
    "megatron-1.7b": _gpt(24, 2304, 24, 51200),
    "megatron-3.6b": _gpt(30, 3072, 32, 51200),
    "megatron-7.5b": _gpt(36, 4096, 32, 51200),
    "megatron-18b": _gpt(40, 6144, 48, 51200),
    "megatron-39b": _gpt(48, 8192, 64, 51200),
    "megatron-76b": _gpt(60, 10240, 80, 51200),
    "megatron-146b": _gpt(80, 12288, 96, 51200),
    "megatron-310b": _gpt(96, 16384, 128, 51200),
    "megatron-530b": _gpt(105, 20480, 128, 51200),
    "megatron-1t": _gpt(128, 25600, 160, 51200),
    # Korthikanti et al. 2022, table 3 (the 530B and 1T models are megatron-530b and megatron-1t)
    "megatron-22b": _gpt(48, 6144, 64, 51200),
    "megatron-175b": _gpt(96, 12288, 96, 51200),
    "mt-nlg-530b": _gpt(105, 20480, 128, 51200),
    # BLOOM uses ALiBi instead of learned positions and an embedding LayerNorm: within 0.02% of the parameters.
    "bloom-176b": _gpt(70, 14336, 112, 250880),
    "opt-175b": _gpt(96, 12288, 96, 50272),
    # Nemotron-4 (NVIDIA 2024): grouped-query attention (8 kv heads), rotary positions, untied embeddings,
    # 256,000-token vocabulary, a squared-ReLU MLP of 4 d_model, modelled as a gated MLP of 8/3 d_model
    # (the same parameters, FLOPs and activation memory).
    "nemotron4-15b": _llama(32, 6144, 48, 8, 16384, 256000, 4096),
    "nemotron4-340b": _llama(96, 18432, 96, 8, 49152, 256000, 4096),
    "llama3-8b": _llama(32, 4096, 32, 8, 14336),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672),
    "llama3-405b": _llama(126, 16384, 128, 8, 53248),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODELS:
        raise ConfigError(
            f"unknown model preset '{name}'. Presets: {', '.join(MODELS)}; or pass --config with a "
            f"meshlm config file (its [model] section)."
        )
    from dataclasses import replace

    return replace(MODELS[name])
