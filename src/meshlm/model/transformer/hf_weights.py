"""Hugging Face tensor names and layouts <-> meshlm state dicts; reading HF weight files.

Llama (also Mistral): a pure renaming. meshlm's rotary embedding uses the same
"rotate_half" layout as Hugging Face, so q/k weights need no permutation.

GPT-2: Hugging Face stores its projections as `Conv1D`, whose weight is
(in_features, out_features): the transpose of `nn.Linear`. The attention input
projection `c_attn` is q, k and v fused along the output dimension; it is split
into meshlm's wq, wk, wv (weights and biases) on import and fused again on export.

Both directions are checked against the names and shapes the model config
implies, with the problems named in Hugging Face terms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from meshlm.config import ConfigError
from meshlm.model.transformer.config import TransformerConfig as ModelConfig
from meshlm.model.transformer.model import Transformer

Tensors = dict[str, torch.Tensor]

# Per-layer names: Hugging Face suffix (after `model.layers.{i}.`) -> meshlm suffix (after `layers.{i}.`).
_LLAMA_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_LLAMA_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# GPT-2 (after `transformer.h.{i}.`): plain copies, and Conv1D modules whose weight is transposed.
_GPT2_LAYER_PLAIN = {
    "ln_1.weight": "attention_norm.weight",
    "ln_1.bias": "attention_norm.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
}
_GPT2_LAYER_CONV1D = {"attn.c_proj": "attention.wo", "mlp.c_fc": "feed_forward.w1", "mlp.c_proj": "feed_forward.w2"}
_GPT2_QKV = "attn.c_attn"
_GPT2_TOP = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.wpe.weight": "pos_embeddings.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
}

# Buffers some checkpoints carry that are not weights: causal masks, rotary frequencies.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- meshlm -> HF


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Tensors:
    """meshlm names and layouts -> Hugging Face ones (LlamaForCausalLM / GPT2LMHeadModel).

    Embedding and output rows beyond `cfg.vocab_size` (padding, e.g. for tensor
    parallelism) are dropped, so the export has exactly `vocab_size` rows. A tied
    output layer is not written (Hugging Face re-ties it from `tie_word_embeddings`).
    """
    state = dict(state)
    for key in ("tok_embeddings.weight", "output.weight"):
        if key in state:
            state[key] = state[key][: cfg.vocab_size]
    if cfg.tied:
        state.pop("output.weight", None)
    out: Tensors = {}
    if cfg.arch == "llama":
        top = {v: k for k, v in _LLAMA_TOP.items()}
        layer = {v: k for k, v in _LLAMA_LAYER.items()}
        for name, t in state.items():
            if name in top:
                out[top[name]] = t
                continue
            i, rest = _split_layer(name)
            out[f"model.layers.{i}.{layer[rest]}"] = t
        return out
    top = {v: k for k, v in _GPT2_TOP.items()}
    plain = {v: k for k, v in _GPT2_LAYER_PLAIN.items()}
    conv = {v: k for k, v in _GPT2_LAYER_CONV1D.items()}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        i, rest = _split_layer(name)
        module, param = rest.rsplit(".", 1)
        prefix = f"transformer.h.{i}."
        if rest in plain:
            out[prefix + plain[rest]] = t
        elif module in conv:
            out[f"{prefix}{conv[module]}.{param}"] = t.t() if param == "weight" else t
        elif module in ("attention.wq", "attention.wk", "attention.wv"):
            qkv.setdefault((i, param), {})[module[-2:]] = t
        else:
            raise KeyError(name)
    for (i, param), parts in qkv.items():
        fused = torch.cat([parts["wq"], parts["wk"], parts["wv"]], dim=0)  # (3d, d) or (3d,)
        out[f"transformer.h.{i}.{_GPT2_QKV}.{param}"] = fused.t() if param == "weight" else fused
    return {k: v.contiguous() for k, v in out.items()}


def _split_layer(name: str) -> tuple[int, str]:
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if not m:
        raise KeyError(name)
    return int(m.group(1)), m.group(2)


# ----------------------------------------------------------------------------- HF -> meshlm


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def normalize_hf_names(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Tensors:
    """Drop non-weight buffers and add the base-model prefix (`model.` / `transformer.`) where
    a checkpoint was saved from the base model or by an old transformers version."""
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    out: Tensors = {}
    for name, t in tensors.items():
        if _IGNORED.search(name):
            continue
        if not name.startswith(prefix) and not name.startswith("lm_head."):
            name = prefix + name
        out[name] = t
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes a model with this config has (built on the meta device: free)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in state_dict_to_hf(model.state_dict(), cfg).items()}


def check_hf_tensors(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Every expected tensor present with the right shape, nothing unknown left over."""
    expected = expected_hf_shapes(cfg)
    present = set(tensors) - ({"lm_head.weight"} if cfg.tied else set())  # a tied head may be stored anyway
    missing = sorted(set(expected) - present, key=_natural)
    unexpected = sorted(present - set(expected), key=_natural)
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs config {expected[k]}"
        for k in sorted(expected, key=_natural)
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensors ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensors meshlm has no place for ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
            )
        if bad:
            parts.append(f"shape mismatches ({'; '.join(bad[:3])})")
        raise ConfigError(
            f"the weights in {source} do not match its config.json: {'; '.join(parts)}. The checkpoint is incomplete, "
            f"belongs to another config, or uses a layout meshlm does not support; re-save it with `save_pretrained`."
        )


def state_dict_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint") -> Tensors:
    """Hugging Face names and layouts -> a meshlm state dict (a tied output layer is left out,
    as in meshlm's own model file). Checks names and shapes first."""
    tensors = normalize_hf_names(tensors, cfg)
    check_hf_tensors(tensors, cfg, source)
    out: Tensors = {}
    if cfg.arch == "llama":
        for name, t in tensors.items():
            if name in _LLAMA_TOP:
                if not (cfg.tied and name == "lm_head.weight"):
                    out[_LLAMA_TOP[name]] = t
                continue
            m = _LAYER_KEY.match(name)
            out[f"layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"] = t
        return out
    d = cfg.d_model
    for name, t in tensors.items():
        if name in _GPT2_TOP:
            out[_GPT2_TOP[name]] = t
            continue
        if name == "lm_head.weight":  # tied: the embedding is the output layer
            continue
        m = _LAYER_KEY.match(name)
        i, rest = m.group(1), m.group(2)
        module, param = rest.rsplit(".", 1)
        prefix = f"layers.{i}."
        if rest in _GPT2_LAYER_PLAIN:
            out[prefix + _GPT2_LAYER_PLAIN[rest]] = t
        elif module in _GPT2_LAYER_CONV1D:
            out[f"{prefix}{_GPT2_LAYER_CONV1D[module]}.{param}"] = t.t().contiguous() if param == "weight" else t
        elif module == _GPT2_QKV:
            fused = t.t() if param == "weight" else t  # (3d, d) or (3d,)
            for j, part in enumerate(("wq", "wk", "wv")):
                out[f"{prefix}attention.{part}.{param}"] = fused[j * d : (j + 1) * d].contiguous()
    return out
