"""The Python API: fit / predict / evaluate with workers=2 equal workers=1 (real worker processes
through the `--nproc` launcher), errors raised before any process starts, a worker's error
re-raised in the caller with its rank and message."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import meshlm
from meshlm.config import ConfigError

# A tiny llama and a small slice of the stdlib: seconds per world.
TINY = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=2,
    vocab_size=512,
    max_seq_len=64,
    seq_len=32,
    micro_batch=4,
    global_batch=8,
    warmup_steps=2,
    eval_every=2,
    eval_batches=2,
    sample_tokens=0,
    max_bytes=200_000,
)
STEPS = 3
PROMPTS = ["def ", "import os\n", "class A:\n    ", "for i in range(", "x = "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The keyword arguments of the tiny model, with a data cache of this module's own."""
    return dict(TINY, cache_dir=str(tmp_path_factory.mktemp("api-cache")))


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    """Three fits of one config: one process, dp2 and tp2 on two worker processes."""
    root = tmp_path_factory.mktemp("api-runs")
    out = {}
    for name, workers, parallel in (("one", 1, None), ("dp2", 2, meshlm.Layout(dp=2)), ("tp2", 2, meshlm.Layout(tp=2))):
        lm = meshlm.LanguageModel("tiny-cpu", **tiny)
        history = lm.fit(steps=STEPS, workers=workers, parallel=parallel, run_dir=root / name, verbose=False)
        out[name] = (lm, history)
    return out


def _close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_fit_on_two_workers_equals_one_process(fitted):
    lm, reference = fitted["one"]
    assert len(reference.history["loss"]) == STEPS
    assert reference.history["val_step"] == [2, 3]  # eval_every=2, and the last step
    assert (lm.run_dir / "model.safetensors").is_file() and (lm.run_dir / "config.toml").is_file()
    weights = load_file(lm.run_dir / "model.safetensors")
    for name in ("dp2", "tp2"):
        other_lm, history = fitted[name]
        assert _close(history.history["loss"], reference.history["loss"], 1e-5), (name, history.history["loss"])
        assert _close(history.history["val_loss"], reference.history["val_loss"], 1e-5), name
        other = load_file(other_lm.run_dir / "model.safetensors")
        assert other.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")
    # The run directory says which layout ran.
    assert "tp = 2" in (fitted["tp2"][0].run_dir / "config.toml").read_text()


def test_predict_and_evaluate_on_two_workers_equal_one_process(fitted):
    lm, _ = fitted["one"]
    greedy = lm.predict(PROMPTS, max_new_tokens=6)
    assert len(greedy) == len(PROMPTS) and all(isinstance(t, str) for t in greedy)
    sampled = dict(max_new_tokens=6, temperature=1.0, seed=3)
    one = lm.predict(PROMPTS, **sampled)
    assert lm.predict(PROMPTS, workers=2, **sampled) == one  # same texts, input order
    assert lm.generate(PROMPTS[2], **sampled) != "" or one[2] == ""
    text = ["def f(x):\n    return x + 1\n" * 12, "import os\nprint(os.getcwd())\n" * 12]
    a, b = lm.evaluate(text), lm.evaluate(text, workers=2)
    assert a["tokens"] == b["tokens"] > 0
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["perplexity"], math.exp(a["loss"]))


def test_gcnn_on_two_workers_equals_one_process(tiny, tmp_path):
    """Another family through the same calls (the issue's example: a gated CNN by keyword)."""
    shape = dict(d_model=32, n_layers=2, channels=32, kernel_size=3)
    common = {k: v for k, v in tiny.items() if k not in ("n_heads", "n_kv_heads", "d_model", "n_layers")}
    runs = {}
    for workers in (1, 2):
        lm = meshlm.LanguageModel("gcnn-tiny", **shape, **common)
        runs[workers] = (lm, lm.fit(steps=STEPS, workers=workers, run_dir=tmp_path / f"w{workers}", verbose=False))
    assert runs[1][0].config.model.family == "gcnn"
    assert _close(runs[2][1].history["loss"], runs[1][1].history["loss"], 1e-5), runs[2][1].history["loss"]
    weights = [load_file(lm.run_dir / "model.safetensors") for lm, _ in runs.values()]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-4, msg=key)
    assert len(runs[2][0].predict(PROMPTS[:2], max_new_tokens=4)) == 2  # the gcnn decoding engine, in-process


def test_from_hf_predicts_what_transformers_generates(fitted, tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf = tmp_path / "hf"
    hf_model.save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer.json").write_bytes((fitted["one"][0].run_dir / "tokenizer.json").read_bytes())
    lm = meshlm.LanguageModel.from_hf(hf, seq_len=32, cache_dir=tiny["cache_dir"])
    assert lm.config.model.d_model == 32 and lm.config.model.n_kv_heads == 1
    ours = lm.predict(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)
    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    for prompt, text in zip(PROMPTS[:2], ours):
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        out = hf_model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokenizer.decode(out[0, ids.shape[1] :].tolist()) == text


def test_load_and_save_round_trip(fitted, tmp_path):
    lm, _ = fitted["one"]
    saved = lm.save(tmp_path / "copy")
    again = meshlm.load(saved)
    assert isinstance(again, meshlm.LanguageModel) and again.config.model.d_model == 32
    assert again.predict(PROMPTS[:2], max_new_tokens=5) == lm.predict(PROMPTS[:2], max_new_tokens=5)


def test_a_worker_error_is_raised_in_the_caller(fitted, tiny, tmp_path):
    # A run that diverges stops with a RunError on every rank (a non-finite step, naming the
    # settings to change): a WorkerError here, with the rank, the worker's message and its traceback.
    lm = meshlm.LanguageModel("tiny-cpu", **dict(tiny, lr=1e30, grad_clip=0.0, eval_every=0))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(meshlm.WorkerError) as caught:
        lm.fit(steps=3, workers=2, run_dir=tmp_path / "diverged", verbose=False)
    assert signal.getsignal(signal.SIGINT) is handler  # the launcher's handler is gone again
    assert caught.value.rank in (0, 1)
    assert caught.value.message.startswith("RunError: training stopped at step")
    assert "train.skip_nonfinite_steps" in caught.value.message
    assert "trainer.py" in caught.value.traceback and "worker rank" in str(caught.value)
    # A user error in a worker (a damaged weights file, which the caller does not read) stays a
    # ConfigError (a ValueError) with the worker's message.
    broken = fitted["one"][0].save(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"worker rank \d: model weights .* are unreadable or corrupt"):
        meshlm.load(broken).predict(PROMPTS[:2], workers=2)


def test_bad_arguments_fail_before_any_process_starts(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown keyword argument 'd_modle'.*did you mean 'd_model'"):
        meshlm.LanguageModel("tiny-cpu", d_modle=64)
    with pytest.raises(ValueError, match="unknown key 'train.lrr'"):
        meshlm.LanguageModel("tiny-cpu", overrides={"train.lrr": 1e-3})
    with pytest.raises(ValueError, match="'train.lr' expects a number"):
        meshlm.LanguageModel("tiny-cpu", lr="fast")
    with pytest.raises(ValueError, match="config file 'no-such-config' not found.*tiny-cpu"):
        meshlm.LanguageModel("no-such-config")
    lm = meshlm.LanguageModel("tiny-cpu", **tiny)
    run = tmp_path / "never"
    for workers in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"workers= must be a positive integer"):
            lm.fit(steps=1, workers=workers, run_dir=run)
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by tp x pp = 4"):
        lm.fit(steps=1, workers=2, parallel=meshlm.Layout(tp=4), run_dir=run)
    with pytest.raises(ValueError, match=r"dp x tp x pp = 4 x 1 x 1 = 4 but the world size is 2"):
        lm.fit(steps=1, workers=2, parallel=meshlm.Layout(dp=4), run_dir=run)
    with pytest.raises(ValueError, match='parallel= must be "auto"'):
        lm.fit(steps=1, workers=2, parallel="fast", run_dir=run)
    with pytest.raises(ValueError, match="no trained weights yet"):
        lm.predict(["def "])
    with pytest.raises(ValueError, match="takes a list of prompts"):
        lm.predict("def ")
    assert not run.exists()


def test_callbacks_and_history(tiny, tmp_path, monkeypatch):
    seen = []

    class Recorder(meshlm.Callback):
        def on_eval_end(self, step, logs):
            seen.append(("eval", step, logs["val_loss"]))

        def on_train_end(self, history):
            seen.append(("end", len(history.losses)))

    monkeypatch.chdir(tmp_path)  # the default run directory is runs/<config>-<time>-<random> under the cwd
    keep = {k: v for k, v in tiny.items() if k in ("vocab_size", "max_bytes", "cache_dir", "sample_tokens")}
    lm = meshlm.LanguageModel("maxent-tiny", eval_every=1, eval_batches=2, **keep)
    recorder = Recorder()
    held_out = ["def g(a, b):\n    return a * b\n" * 10]
    history = lm.fit(
        steps=2,
        callbacks=[recorder, lambda step, logs: seen.append(("step", step, logs["loss"]))],
        validation_data=held_out,
    )
    assert [s[1] for s in seen if s[0] == "step"] == [1, 2]
    assert [s[2] for s in seen if s[0] == "step"] == history.history["loss"]
    # Two evaluations of the held-out split (eval_every=1), then validation_data after the last step.
    assert [s[2] for s in seen if s[0] == "eval"] == history.history["val_loss"][:2]
    assert history.history["val_step"] == [1, 2, 2]
    assert history.history["val_loss"][2] == lm.evaluate(held_out)["loss"]
    assert seen[-1] == ("end", 2)
    assert Path(history.run_dir).parent.name == "runs" and history.run_dir.name.startswith("maxent-tiny-")
