"""Right context for taggers (single process): non-causal attention (`model.causal=false`) and
the bidirectional LSTM (`model.bidirectional=true`) let a position see the tokens after it, their
causal defaults do not; a pretrained unidirectional LSTM loads into a bidirectional task model
with only the reverse direction missing; taggers (not classifiers) fine-tune with right context
by default; and the language-model commands refuse such a model (exit 2, one paragraph naming
the key) before any work."""

from __future__ import annotations

import pytest
import torch
from task_fixtures import TINY_LLAMA, TINY_LSTM, classify_records, make_backbone, meshlm, ner_records, write_jsonl

from meshlm.config import ConfigError, load_config
from meshlm.inference.loading import find_model_files
from meshlm.model.registry import build_model
from meshlm.tasks.backbone import load_backbone_weights
from meshlm.tasks.config import TaskRunConfig, TaskSettings
from meshlm.tasks.finetune import finetune_config
from meshlm.tasks.spec import task_model_config


def _outputs_before_and_after_a_later_change(overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..5 of a row, then of the same row with its token 8 changed."""
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, seed=0).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % cfg.model.vocab_size
    with torch.no_grad():
        return model(tokens)[:, :6], model(changed)[:, :6]


@pytest.mark.parametrize(
    "base, key, right_context",
    [
        (TINY_LLAMA, "model.causal", "false"),
        (TINY_LLAMA + ['model.arch="gpt2"', "model.n_kv_heads=0"], "model.causal", "false"),
        (TINY_LSTM, "model.bidirectional", "true"),
    ],
    ids=["llama", "gpt2", "lstm"],
)
def test_only_the_right_context_option_sees_later_tokens(base, key, right_context):
    default = _outputs_before_and_after_a_later_change(base)
    assert torch.equal(*default), "the default model must not see a later token"
    before, after = _outputs_before_and_after_a_later_change(base + [f"{key}={right_context}"])
    assert (before - after).abs().max() > 1e-4, "with right context, an earlier position sees a later token"


def test_unidirectional_lstm_run_loads_into_a_bidirectional_tagger(tmp_path):
    backbone = make_backbone(tmp_path / "lstm", TINY_LSTM)
    run_cfg = load_config(None, TINY_LSTM)
    cfg = TaskRunConfig(model=run_cfg.model, data=run_cfg.data, train=run_cfg.train)
    cfg.model.bidirectional = True
    cfg.task = TaskSettings(name="ner", labels=["O", "B-PER", "I-PER"])
    model = build_model(task_model_config(cfg), seed=1)
    missing = load_backbone_weights(model, backbone / "model.safetensors")
    expected = [
        f"layers.{i}.reverse_lstm.{w}_l0" for i in range(2) for w in ("bias_hh", "bias_ih", "weight_hh", "weight_ih")
    ]
    assert missing == sorted(expected)
    uni = build_model(load_config(None, TINY_LSTM).model, seed=0)  # make_backbone's weights
    assert torch.equal(model.backbone.layers["1"].lstm.weight_hh_l0, uni.layers["1"].lstm.weight_hh_l0)


def test_language_model_commands_refuse_right_context(tmp_path):
    proc = meshlm("train", "--set", "model.causal=false", "--out", "lm", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.causal = false" in proc.stderr and "model.causal=true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "lm").exists()
    proc = meshlm("train", "--config", "lstm-tiny", "--set", "model.bidirectional=true", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "model.bidirectional = true" in proc.stderr, proc.stderr[-2000:]

    run = make_backbone(tmp_path / "tagger-backbone", TINY_LLAMA + ["model.causal=false"])
    proc = meshlm("generate", "--run", str(run), "--prompt", "the cat", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("meshlm: error:") == 1 and "model.causal = false" in proc.stderr
    with pytest.raises(ConfigError, match="model.causal = false"):  # eval, predict and serve find it here too
        find_model_files(run=run)


def test_taggers_fine_tune_with_right_context_by_default(tmp_path):
    llama, lstm = make_backbone(tmp_path / "llama"), make_backbone(tmp_path / "lstm", TINY_LSTM)
    ner = write_jsonl(tmp_path / "ner.jsonl", ner_records(8, 1))
    clf = write_jsonl(tmp_path / "clf.jsonl", classify_records(8, 1))
    assert finetune_config("ner", ner, llama).model.causal is False
    assert finetune_config("ner", ner, lstm).model.bidirectional is True
    assert finetune_config("ner", ner, llama, ["model.causal=true"]).model.causal is True
    assert finetune_config("classify", clf, llama).model.causal is True
