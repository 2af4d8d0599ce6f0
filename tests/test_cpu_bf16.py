"""bf16 on CPU: the native-bf16 detection and the trainer's log line about it, and decoding in
bfloat16 (with and without int8 weights) against float32. bf16 training itself against float32:
tests/test_train.py::test_activation_checkpointing_and_bf16_autocast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshlm.distributed.env import cpu_native_bf16
from meshlm.inference.engine import Engine
from meshlm.inference.quantize import Int8Linear
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig
from meshlm.train.step import dtype_note

V = 384
CFG = TransformerConfig(
    arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=128, init_std=0.1
)


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else ""
    assert cpu_native_bf16() == expected


def test_dtype_note_names_what_the_cpu_can_do():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert "emulated" in dtype_note("bfloat16", cpu, "") and "train.dtype=float32" in dtype_note("bfloat16", cpu, "")
    assert "AMX" in dtype_note("bfloat16", cpu, "AMX")
    assert "train.dtype=bfloat16 may train faster" in dtype_note("float32", cpu, "AVX512-BF16")
    assert dtype_note("float32", cpu, "") is None  # the reference path: nothing to say
    assert dtype_note("bfloat16", gpu, "") is None


def _prefill_logits(engine: Engine, prompts: list[list[int]]) -> torch.Tensor:
    state = engine.decoder.new_state(len(prompts), 64)
    with torch.no_grad():
        return state.prefill(prompts, list(range(len(prompts)))).float()


def test_bf16_decoding_tracks_float32_with_and_without_int8_weights():
    prompts = [list(range(1, 14)), list(range(40, 47))]
    reference = _prefill_logits(Engine(build_model(CFG, seed=0).eval()), prompts)
    bf16 = build_model(CFG, seed=0).to(torch.bfloat16).eval()
    for quantize in ("none", "int8"):
        engine = Engine(bf16, quantize=quantize)
        if quantize == "int8":  # weight-only int8 with bf16 activations
            assert any(isinstance(m, Int8Linear) for m in engine.decoder.model.modules())
        logits = _prefill_logits(engine, prompts)
        error = ((logits - reference).abs().max() / reference.abs().max()).item()
        assert 0 < error < 0.1, (quantize, error)
