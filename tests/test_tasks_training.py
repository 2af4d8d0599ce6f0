"""Fine-tuning details a single process shows: training rows trimmed to the longest example of
the step's global batch (tasks/objective.py; the width is that example's, and for a
left-to-right backbone the loss equals the untrimmed rows' loss), and the saved model being the
best evaluated one."""

from __future__ import annotations

import pytest
import torch
from task_fixtures import TINY_LSTM, classify_records, make_backbone, write_jsonl

from meshlm.data.tokenizer import load_tokenizer
from meshlm.model.registry import build_model
from meshlm.tasks.encoding import encode, pad_id
from meshlm.tasks.finetune import finetune_config
from meshlm.tasks.formats import read_examples
from meshlm.tasks.objective import TaskObjective
from meshlm.tasks.spec import with_task_model


def test_trimmed_rows_give_the_untrimmed_loss(tmp_path):
    bb = make_backbone(tmp_path / "bb")
    data = write_jsonl(tmp_path / "c.jsonl", classify_records(40, 1))
    cfg = finetune_config("classify", data, bb, ["task.ngram_buckets=512", "task.dropout=0.0"])
    examples, _ = read_examples(data, "classify")
    tokenizer = load_tokenizer(bb / "tokenizer.json")
    enc = encode(examples, tokenizer, "classify", cfg.task.labels, cfg.data.seq_len)
    model = build_model(with_task_model(cfg).model, seed=0).eval()
    torch.nn.init.normal_(model.ngram_embedding.proj.weight, std=0.1)  # let the n-grams count
    full = TaskObjective("classify", cfg.task.labels, enc, None, seed=0, pad=pad_id(tokenizer))
    trim = TaskObjective("classify", cfg.task.labels, enc, None, seed=0, pad=pad_id(tokenizer), trim=True)
    for step in range(3):
        for objective in (full, trim):
            objective.begin_step(step, global_batch=8, micro_batches=2)
        ids = full.example_ids(step, range(8))
        (x_full, y_full), (x, y) = full.batch(step, range(4)), trim.batch(step, range(4))
        assert x_full.shape[1] == cfg.data.seq_len
        assert x.shape[1] == max(enc.lengths[i] for i in ids) < cfg.data.seq_len
        with torch.no_grad():
            a, b = full.loss_sum(model(x_full), y_full), trim.loss_sum(model(x), y)
        assert torch.allclose(a, b, rtol=1e-6), (a, b)


def test_the_saved_model_is_the_best_evaluated_one_not_the_last(tmp_path):
    """finetune keeps the best validation score's weights; in one CPU process the gathered state
    is the live parameters, so keeping it without a copy saved the last step's model instead."""
    from meshlm.tasks.finetune import finetune
    from meshlm.tasks.predict import load_task_model

    bb = make_backbone(tmp_path / "bb")
    train = write_jsonl(tmp_path / "t.jsonl", classify_records(48, 1))
    valid = write_jsonl(tmp_path / "v.jsonl", classify_records(24, 2))
    sets = ["task.epochs=0", "train.steps=12", "train.eval_every=1", "train.lr=0.05", "train.warmup_steps=0"]
    cfg = finetune_config("classify", train, bb, [*sets, "task.ngram_buckets=512", "train.progress=false"])
    result = finetune(cfg, train, valid, tmp_path / "run", log=lambda *a, **k: None)
    losses = [e["loss"] for e in result.evals]
    assert result.best["step"] < len(result.evals) and len(set(losses)) > 1, "the setup must not keep the last step"
    loaded = load_task_model(tmp_path / "run")
    tokenizer = load_tokenizer(bb / "tokenizer.json")
    examples, _ = read_examples(valid, "classify")
    enc = encode(examples, tokenizer, "classify", cfg.task.labels, cfg.data.seq_len)
    objective = TaskObjective("classify", cfg.task.labels, None, enc, seed=0, pad=pad_id(tokenizer))
    x, y = objective.eval_batch(range(len(enc)), len(enc))
    with torch.no_grad():
        stats = objective.eval_stats(None, loaded.model.eval()(x), y)
    assert abs(objective.summarize(stats)["loss"] - result.best["loss"]) <= 1e-5 * result.best["loss"]


def test_default_epochs_grow_on_small_sets():
    from meshlm.tasks.finetune import default_epochs

    assert default_epochs("classify", 9806) == 4  # 307 steps an epoch: 4 is enough steps
    assert default_epochs("classify", 2951) == 8  # the built-in docstrings: at least 700 steps
    assert default_epochs("srl", 6000) == default_epochs("ner", 6000) == 8  # the built-in taggers: 1500
    assert default_epochs("ner", 20) == 20  # a handful of examples: capped


def test_fine_tuning_learning_rate_is_the_backbone_familys(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", classify_records(40, 1))
    llama = finetune_config("classify", data, make_backbone(tmp_path / "llama")).train
    lstm = finetune_config("classify", data, make_backbone(tmp_path / "lstm", TINY_LSTM)).train
    assert (llama.lr, llama.min_lr) == pytest.approx((1e-3, 1e-4))
    assert (lstm.lr, lstm.min_lr) == pytest.approx((1e-2, 1e-3))
    mine = finetune_config("classify", data, tmp_path / "lstm", ["train.lr=5e-3"]).train
    assert (mine.lr, mine.min_lr) == pytest.approx((5e-3, 1e-3))  # --set wins


def test_early_stopping_is_the_default_for_epoch_runs_only(tmp_path):
    bb = make_backbone(tmp_path / "bb")
    data = write_jsonl(tmp_path / "c.jsonl", classify_records(40, 1))
    assert finetune_config("classify", data, bb).task.patience == 1
    steps = ["task.epochs=0", "train.steps=3"]
    assert finetune_config("classify", data, bb, steps).task.patience == 0  # runs the steps asked for
    assert finetune_config("classify", data, bb, [*steps, "task.patience=2"]).task.patience == 2
