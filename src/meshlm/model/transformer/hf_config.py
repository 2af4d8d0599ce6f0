"""Hugging Face `config.json` <-> meshlm `ModelConfig`.

Only configurations that meshlm's model computes *exactly* are accepted. Anything
that would change the maths (rope scaling, sliding-window attention, biases the
llama variant lacks, another activation, ...) fails with one ConfigError that
names every offending key, instead of importing a model that silently differs.

Both the transformers 4.x spelling (`rope_theta`, `rope_scaling`) and the 5.x
spelling (`rope_parameters`) are read; exports write both, so either version
loads them.
"""

from __future__ import annotations

from typing import Any

from meshlm.config import ConfigError
from meshlm.model.transformer.config import TransformerConfig as ModelConfig

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2_LIKE = ("GPT2LMHeadModel",)
SUPPORTED_ARCHITECTURES = LLAMA_LIKE + GPT2_LIKE

# The Hugging Face class defaults: `save_pretrained` in transformers 4.x omits keys
# whose value equals the class default, so a missing key means this value.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
    ),
    "MistralForCausalLM": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        sliding_window=4096,
        initializer_range=0.02,
    ),
    "Qwen2ForCausalLM": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        initializer_range=0.02,
    ),
    "GPT2LMHeadModel": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.02,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
    ),
}
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
# Activations that are the same function as meshlm's (SiLU; GPT-2's tanh GELU).
_LLAMA_ACTS = ("silu", "swish")
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")


def hf_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not archs:
        by_type = {v: k for k, v in MODEL_TYPES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
        raise ConfigError(
            f"{source} names no 'architectures' (and its model_type {hf.get('model_type')!r} is not one meshlm knows). "
            f"meshlm imports {', '.join(SUPPORTED_ARCHITECTURES)}; add the right 'architectures' entry to config.json."
        )
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ConfigError(
        f"{source}: architecture {', '.join(map(str, archs))} is not supported by meshlm. Supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}. Convert the model with its own library, or pick a model of a supported family."
    )


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config dict to a meshlm ModelConfig, refusing what meshlm would compute differently."""
    arch = hf_architecture(hf, source)
    get = _Getter(hf, _DEFAULTS[arch], source)
    problems: list[str] = []
    if arch in GPT2_LIKE:
        cfg = _gpt2_config(get, problems)
    else:
        cfg = _llama_config(arch, get, problems)
    if problems:
        raise ConfigError(
            f"{source}: this {arch} model uses features meshlm does not implement, so its outputs would differ: "
            f"{'; '.join(problems)}. Only models without these features can be imported (meshlm supports plain "
            f"{', '.join(SUPPORTED_ARCHITECTURES[:2])} and {GPT2_LIKE[0]})."
        )
    if cfg.d_model <= 0 or cfg.n_heads <= 0 or cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"{source}: hidden size {cfg.d_model} is not divisible by the {cfg.n_heads} attention heads; the config is malformed."
        )
    if cfg.n_heads % cfg.kv_heads:
        raise ConfigError(
            f"{source}: {cfg.n_heads} attention heads are not a multiple of the {cfg.kv_heads} key/value heads; the config is malformed."
        )
    return cfg


class _Getter:
    """Reads a key, falling back to the class default; `.int` / `.float` check the type."""

    def __init__(self, hf: dict[str, Any], defaults: dict[str, Any], source: str):
        self.hf, self.defaults, self.source = hf, defaults, source

    def __call__(self, key: str, default: Any = None) -> Any:
        if key in self.hf:
            return self.hf[key]
        return self.defaults.get(key, default)

    def int(self, key: str) -> int:
        value = self(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            and not (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{self.source}: '{key}' must be an integer, got {value!r}. Fix config.json.")
        return int(value)

    def float(self, key: str) -> float:
        value = self(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.source}: '{key}' must be a number, got {value!r}. Fix config.json.")
        return float(value)


def _rope_theta_and_scaling(get: _Getter, problems: list[str]) -> float:
    theta = get("rope_theta")
    params = get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            problems.append(
                f"'rope_parameters' has rope_type {rope_type!r} (only plain RoPE, rope_type 'default', is supported)"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(
                f"'rope_parameters.partial_rotary_factor' is {params['partial_rotary_factor']} (only 1.0 is supported)"
            )
    elif params is not None:
        problems.append(f"'rope_parameters' is {params!r}, expected a table with rope_type 'default'")
    scaling = get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            problems.append(f"'rope_scaling' is {scaling!r} (RoPE scaling is not supported; it must be null)")
    return float(theta if theta is not None else 10000.0)


def _llama_config(arch: str, get: _Getter, problems: list[str]) -> ModelConfig:
    d_model, n_heads = get.int("hidden_size"), get.int("num_attention_heads")
    max_pos = get.int("max_position_embeddings")
    kv_heads = get.int("num_key_value_heads") if get("num_key_value_heads") is not None else n_heads
    theta = _rope_theta_and_scaling(get, problems)
    if arch == "Qwen2ForCausalLM":
        problems.append(
            "Qwen2 has biases on its q/k/v projections ('attention bias'), which meshlm's llama variant does not have"
        )
    if get("attention_bias", False):
        problems.append("'attention_bias' is true (meshlm's llama attention has no biases)")
    if get("mlp_bias", False):
        problems.append("'mlp_bias' is true (meshlm's llama MLP has no biases)")
    act = get("hidden_act")
    if act not in _LLAMA_ACTS:
        problems.append(f"'hidden_act' is {act!r} (meshlm's llama MLP uses 'silu')")
    head_dim = get.int("head_dim") if get("head_dim") is not None else None
    if head_dim is not None and n_heads and head_dim * n_heads != d_model:
        problems.append(f"'head_dim' is {head_dim}, not hidden_size / num_attention_heads = {d_model / n_heads:g}")
    sliding = get.int("sliding_window") if get("sliding_window") is not None else None
    if sliding is not None and sliding < max_pos and (arch != "Qwen2ForCausalLM" or get("use_sliding_window", False)):
        problems.append(
            f"'sliding_window' is {sliding} (< max_position_embeddings {max_pos}; sliding-window attention is not supported)"
        )
    return ModelConfig(
        arch="llama",
        d_model=d_model,
        n_layers=get.int("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=0 if kv_heads == n_heads else kv_heads,
        vocab_size=get.int("vocab_size"),
        ffn_hidden=get.int("intermediate_size"),
        max_seq_len=max_pos,
        rope_theta=theta,
        norm_eps=get.float("rms_norm_eps"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=get.float("initializer_range"),
    )


def _gpt2_config(get: _Getter, problems: list[str]) -> ModelConfig:
    d_model = get.int("n_embd")
    act = get("activation_function")
    if act not in _GPT2_ACTS:
        problems.append(f"'activation_function' is {act!r} (meshlm's gpt2 MLP uses 'gelu_new', the tanh GELU)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if get(key, False):
            problems.append(f"'{key}' is true")
    if not get("scale_attn_weights", True):
        problems.append("'scale_attn_weights' is false (meshlm scales attention by 1/sqrt(head_dim))")
    if not get("tie_word_embeddings", True):
        problems.append(
            "'tie_word_embeddings' is false (meshlm's gpt2 always ties the output layer to the token embedding)"
        )
    n_inner = get.int("n_inner") if get("n_inner") is not None else None
    return ModelConfig(
        arch="gpt2",
        d_model=d_model,
        n_layers=get.int("n_layer"),
        n_heads=get.int("n_head"),
        vocab_size=get.int("vocab_size"),
        ffn_hidden=int(n_inner) if n_inner else 4 * d_model,
        max_seq_len=get.int("n_positions"),
        norm_eps=get.float("layer_norm_epsilon"),
        tie_embeddings=True,
        init_std=get.float("initializer_range"),
    )


def hf_config_from_model(
    cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The `config.json` dict for a meshlm model: LlamaForCausalLM or GPT2LMHeadModel."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tied,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            # meshlm trains without dropout; keep HF fine-tuning faithful to that.
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta / rope_scaling, 5.x reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        **common,
    }


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "hf_architecture",
    "model_config_from_hf",
    "hf_config_from_model",
]
