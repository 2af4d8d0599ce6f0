"""Hashed n-gram embeddings (tasks/ngrams.py): each position's rows come from the tokens that
end there and from nothing else, the hash is the documented fixed function, a fresh task model
with them computes exactly what the backbone alone computes, classify turns them on by default,
and bad settings are refused before any work."""

from __future__ import annotations

import pytest
import torch
from task_fixtures import classify_records, make_backbone, ner_records, write_jsonl

from meshlm.config import ConfigError
from meshlm.model.registry import build_model
from meshlm.tasks.finetune import finetune_config
from meshlm.tasks.ngrams import NgramEmbedding
from meshlm.tasks.spec import task_model_config, with_task_model


def reference_rows(tokens: list[int], vocab: int, buckets: int, orders: int) -> list[list[int]]:
    """The hash written out in plain Python integers."""
    x = [0] * (orders - 1) + [t + 1 for t in tokens]
    rows = []
    for t in range(orders - 1, len(x)):
        h, row = 0, []
        for n in range(1, orders + 1):
            h = h * (vocab + 1) + x[t - n + 1]
            row.append(((h % (2**31 - 1)) * 1_000_000_007 + n) % buckets)
        rows.append(row)
    return rows


def test_rows_are_the_hash_of_the_tokens_ending_at_each_position():
    ngrams = NgramEmbedding(vocab_size=50_000, buckets=1 << 18, dim=4, d_out=8, orders=3)
    tokens = torch.tensor([[5, 49_999, 0, 17, 5, 49_999, 0]])
    rows = ngrams.bucket_ids(tokens)
    assert rows[0].tolist() == reference_rows(tokens[0].tolist(), 50_000, 1 << 18, 3)
    # The same trigram at positions 2 and 6 has the same rows; at the start the history differs.
    assert rows[0, 2].tolist() == rows[0, 6].tolist()
    assert rows[0, 1, 0] == rows[0, 5, 0] and rows[0, 1, 1] == rows[0, 5, 1] and rows[0, 1, 2] != rows[0, 5, 2]
    # Changing a token moves only the rows of the n-grams that contain it.
    changed = tokens.clone()
    changed[0, 3] = 18
    diff = (ngrams.bucket_ids(changed) != rows).any(-1)[0].tolist()
    assert diff == [False, False, False, True, True, True, False]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("ngrams")
    write_jsonl(root / "c.jsonl", classify_records(12, 1))
    write_jsonl(root / "n.jsonl", ner_records(12, 1))
    return make_backbone(root / "bb"), root


def test_a_fresh_model_computes_what_the_backbone_alone_computes(backbone):
    bb, root = backbone
    with_ngrams = finetune_config("classify", root / "c.jsonl", bb, ["task.ngram_buckets=512"])
    without = finetune_config("classify", root / "c.jsonl", bb, ["task.ngram_buckets=0"])
    a = build_model(with_task_model(with_ngrams).model, seed=3).eval()
    b = build_model(with_task_model(without).model, seed=3).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("ngram_embedding.")})
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(a(x), b(x))
    a.ngram_embedding.proj.weight.data.normal_()  # once trained, the n-grams change the scores
    assert not torch.allclose(a(x), b(x))


def test_classify_has_ngrams_by_default_and_taggers_do_not(backbone):
    bb, root = backbone
    assert task_model_config(finetune_config("classify", root / "c.jsonl", bb)).ngram_buckets == 1 << 18
    assert task_model_config(finetune_config("ner", root / "n.jsonl", bb)).ngram_buckets == 0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("task.ngram_buckets=-1", "'task.ngram_buckets' (-1) must be >= 0"),
        ("task.ngram_orders=0", "'task.ngram_orders' (0)"),
        ("task.ngram_orders=9", "would overflow 64-bit integers"),
    ],
)
def test_bad_ngram_settings_are_refused_before_work(backbone, override, fragment):
    bb, root = backbone
    with pytest.raises(ConfigError, match="task.ngram") as err:
        finetune_config("classify", root / "c.jsonl", bb, [override])
    assert fragment in str(err.value)
