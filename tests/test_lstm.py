"""The LSTM family on one device and on a tensor-parallel pair: shapes, counts and FLOPs against
the built model, initialisation, causality, and incremental decoding with (h, c) per slot
against full recomputation (also on a vocabulary-parallel shard). The layouts are in the parity
matrix (tests/family_cases.py), resume across layouts in test_checkpoint.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from meshlm.config import ConfigError, load_config
from meshlm.distributed.spawn import run_distributed
from meshlm.model.lstm.config import LSTMConfig
from meshlm.model.lstm.model import LSTMLanguageModel
from meshlm.model.registry import build_model, empty_model, family_spec
from meshlm.model.stats import count_params, flops_per_token

DECODE_ATOL = 1e-5

VARIANTS = {
    # tied, hidden wider than the embedding: a projection before the output layer
    "tied-proj": LSTMConfig(family="lstm", vocab_size=101, max_seq_len=64, d_embed=24, d_hidden=40, n_layers=3),
    "tied": LSTMConfig(family="lstm", vocab_size=101, max_seq_len=64, d_embed=32, d_hidden=32, n_layers=2),
    "untied": LSTMConfig(
        family="lstm", vocab_size=101, max_seq_len=64, d_embed=24, d_hidden=40, n_layers=2, tie_embeddings=False
    ),
}


@pytest.fixture(params=list(VARIANTS))
def cfg(request):
    return VARIANTS[request.param]


def native_lstm():
    """nn.LSTM through PyTorch's native CPU kernels (per-step matmuls that FlopCounterMode sees)
    instead of oneDNN's fused RNN, which the counter does not know."""
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    return torch.backends.mkldnn.flags(enabled=False)


def counted_flops(fn) -> int:
    with native_lstm(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_shapes_params_and_flops_match_the_built_model(cfg):
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (3, 17))
    assert model(x).shape == (3, 17, cfg.vocab_size)
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == count_params(cfg)
    assert (model.output.weight is model.embedding.weight) == cfg.tied
    assert (model.proj is not None) == (cfg.tied and cfg.d_hidden != cfg.d_embed)
    # every matmul of the forward, counted by torch: 2 FLOPs per weight per token
    with torch.no_grad():
        flops = counted_flops(lambda: model(x))
    assert flops == flops_per_token(cfg, 17, training=False) * x.numel()
    assert flops_per_token(cfg, 17, training=True) == 3 * flops_per_token(cfg, 17, training=False)
    costs = family_spec(cfg).stage_costs(cfg)
    assert len(costs.blocks) == cfg.n_layers and costs.last >= cfg.d_output_in * cfg.vocab_size


def test_meta_build_is_deterministic_and_ties_after_materialising(cfg):
    with torch.device("meta"):
        meta = LSTMLanguageModel(cfg)
    assert all(p.is_meta for p in meta.parameters())
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert not p.is_meta and torch.equal(p, q), name
    assert not torch.equal(a.layers["0"].lstm.weight_hh_l0, build_model(cfg, seed=4).layers["0"].lstm.weight_hh_l0)
    bound = 1 / cfg.d_hidden**0.5
    assert a.layers["0"].lstm.weight_ih_l0.abs().max() <= bound
    assert torch.count_nonzero(a.output.bias) == 0
    empty = empty_model(cfg)
    assert (empty.output.weight is empty.embedding.weight) == cfg.tied
    empty.load_state_dict(a.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(empty(x), a(x))  # nn.LSTM's flat weights follow the loaded parameters


def test_causality_and_dropout():
    cfg = VARIANTS["tied-proj"]
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    noisy = build_model(LSTMConfig(**{**cfg.__dict__, "dropout": 0.5}), seed=0)
    with torch.no_grad():
        assert torch.equal(noisy.eval()(x), a)  # eval: dropout off, same weights, same function
        assert not torch.allclose(noisy.train()(x), a)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(None, ['model.family="lstm"', "model.dropout=1.0"])
    with pytest.raises(ConfigError, match="model.d_hidden"):
        load_config(None, ['model.family="lstm"', "model.d_hidden=0"])
    with pytest.raises(ConfigError, match="unknown key 'model.n_heads'.*model.family 'lstm'"):
        load_config(None, ['model.family="lstm"', "model.n_heads=4"])
    cfg = load_config("lstm-tiny")
    assert cfg.model.family == "lstm" and family_spec(cfg).name == "lstm"


# ----------------------------------------------------------------------------- decoding


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The recomputation reference: the whole sequence from the start, logits after its last token."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def decode_script(model, state) -> list[float]:
    """Prefill three prompts of different lengths into slots 2, 0, 1 (packed together), decode 12
    tokens, release a finished slot and move the last one into it, refill the freed slot
    with a new prompt, prefill more tokens onto a live slot, decode on. After every step each
    slot's logits must equal the full recomputation of its sequence."""
    gen = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    seqs = {slot: torch.randint(0, V, (n,), generator=gen).tolist() for slot, n in ((2, 5), (0, 11), (1, 1))}
    diffs = []

    def compare(logits, slots):
        for row, slot in zip(logits, slots):
            diffs.append((row - full_logits(model, seqs[slot])).abs().max().item())

    slots = [2, 0, 1]
    compare((state.prefill([seqs[s] for s in slots], slots)), slots)
    assert state.lengths[:3] == [11, 1, 5]

    def decode_rounds(n_active, rounds):
        for _ in range(rounds):
            new = torch.randint(0, V, (n_active,), generator=gen)
            for s in range(n_active):
                seqs[s].append(int(new[s]))
            compare(state.decode(new), range(n_active))

    decode_rounds(3, 12)
    state.release(0)  # sequence 0 finishes; the last active one (slot 2) moves into its place
    state.move_slot(2, 0)
    seqs[0] = seqs.pop(2)
    assert state.lengths[:3] == [5 + 12, 1 + 12, 0]  # slot 2 is free: its stale (h, c) must not leak
    seqs[2] = torch.randint(0, V, (7,), generator=gen).tolist()
    compare((state.prefill([seqs[2]], [2])), [2])
    extra = torch.randint(0, V, (4,), generator=gen).tolist()  # a live slot takes more prompt
    seqs[1] += extra
    compare((state.prefill([extra], [1])), [1])
    decode_rounds(3, 6)
    return diffs


def test_cached_decode_equals_full_recomputation(cfg):
    model = build_model(cfg, seed=0).eval()
    state = family_spec(cfg).decode_state(model, 4, cfg.max_seq_len)
    diffs = decode_script(model, state)
    assert len(diffs) == 3 + 3 * 12 + 2 + 3 * 6
    assert max(diffs) <= DECODE_ATOL, max(diffs)
    assert state.nbytes() == 2 * cfg.n_layers * 4 * cfg.d_hidden * 4  # h and c, float32
    with pytest.raises(ValueError, match="max_len"):
        state.prefill([[1] * (cfg.max_seq_len + 1)], [3])


def test_fixed_shape_step_for_cuda_graphs_is_the_decode_step():
    """decode_static (what CUDA graphs record) computes decode's logits and state, padding rows
    included, without touching the host-side lengths."""
    cfg = VARIANTS["tied-proj"]
    model = build_model(cfg, seed=0).eval()
    a, b = (family_spec(cfg).decode_state(model, 4, cfg.max_seq_len) for _ in range(2))
    for state in (a, b):
        state.prefill([[3, 4, 5], [6]], [0, 1])
    tokens = torch.tensor([7, 8])
    want = a.decode(tokens)
    got = b.decode_static(torch.tensor([7, 8, 0, 0]), torch.tensor([3, 1, 63, 63]))  # bucket of 4
    assert torch.equal(got[:2], want) and torch.equal(b.h[:, :2], a.h[:, :2]) and torch.equal(b.c[:, :2], a.c[:, :2])
    assert b.lengths == [3, 1, 0, 0] and a.lengths == [4, 2, 0, 0]


def test_decode_cost_per_token_does_not_grow_with_position():
    """FLOPs of one decode step at position 2 and at position 200 are equal, and equal the
    model's forward FLOPs of one token: the state is carried, nothing is recomputed."""
    cfg = LSTMConfig(family="lstm", vocab_size=101, max_seq_len=512, d_embed=24, d_hidden=40, n_layers=2)
    model = build_model(cfg, seed=0).eval()
    state = family_spec(cfg).decode_state(model, 2, cfg.max_seq_len)
    state.prefill([[1], [2, 3]], [0, 1])
    early = counted_flops(lambda: state.decode(torch.tensor([4, 5])))
    state.prefill([list(range(1, 99)) * 2, [7] * 196], [0, 1])
    assert state.lengths[:2] == [198, 199]
    late = counted_flops(lambda: state.decode(torch.tensor([4, 5])))
    assert early == late == 2 * flops_per_token(cfg, 1, training=False)


def _tp_decode(rank: int) -> list[float]:
    """A vocabulary-parallel shard (tp2, vocabulary 101 padded to 102) decodes through the same
    state code as one device; its gathered logits must equal the single-device state's, step by
    step (prefill of three packed prompts, then 10 greedy decode steps)."""
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel
    from meshlm.parallel.vocab_parallel import gather_vocab_logits

    cfg, group = VARIANTS["untied"], dist.group.WORLD
    reference = build_model(cfg, seed=0).eval()
    shard = build_model(cfg, seed=0).eval()
    apply_tensor_parallel(shard, group)
    assert shard.output.weight.shape[0] == 51
    state = family_spec(cfg).decode_state(shard, 4, cfg.max_seq_len)
    ref_state = family_spec(cfg).decode_state(reference, 4, cfg.max_seq_len)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    a = gather_vocab_logits(state.prefill(prompts, [0, 1, 2]), group, cfg.vocab_size)
    b = ref_state.prefill(prompts, [0, 1, 2])
    diffs = [(a - b).abs().max().item()]
    for _ in range(10):
        tokens = b.argmax(-1)
        a = gather_vocab_logits(state.decode(tokens), group, cfg.vocab_size)
        b = ref_state.decode(tokens)
        diffs.append((a - b).abs().max().item())
    return diffs


def test_decode_on_a_vocabulary_parallel_shard_equals_one_device():
    for diffs in run_distributed(_tp_decode, 2):
        assert len(diffs) == 11 and max(diffs) <= DECODE_ATOL, diffs


# ----------------------------------------------------------------------------- training

TRAIN = [
    'model.family="lstm"',
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "model.d_embed=64",
    "model.d_hidden=64",
    "model.n_layers=2",
    "data.seq_len=32",
    "data.max_bytes=600000",
    "train.micro_batch=16",
    "train.global_batch=16",
    "train.steps=150",
    "train.warmup_steps=10",
    "train.eval_every=50",
    "train.eval_batches=4",
    "train.lr=0.02",
    "train.min_lr=0.002",
    "train.weight_decay=0.01",
    "train.grad_clip=0.5",
    "train.sample_tokens=8",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def train_cache(prepare_corpus):
    return prepare_corpus(TRAIN)


def test_lstm_trains_with_a_falling_validation_loss(train_cache, tmp_path):
    """lstm-tiny's recipe, smaller: the loss leaves log(V) and keeps falling past the unigram level."""
    from meshlm.train.metrics import read_metrics
    from meshlm.train.trainer import train

    cfg = load_config("lstm-tiny", TRAIN + [f'data.cache_dir="{train_cache}"'])
    result = train(cfg, tmp_path / "run", log=lambda *a, **k: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = sum(r["loss"] for r in records[:3]) / 3  # steps 1-3
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 3 and result.final_val_loss == evals[-1]
    assert evals[0] > evals[1] > evals[2]
    assert first > math.log(cfg.model.vocab_size) - 0.5
    assert evals[-1] < first - 1.0, (first, evals)


def test_activation_checkpointing_recomputes_the_same_layers(train_cache, tmp_path):
    """Checkpointing wraps each LSTM layer (a block); the recomputed backward is the same."""
    from meshlm.train.trainer import train

    small = TRAIN + ["train.steps=3", "train.eval_every=0", "train.sample_tokens=0", "train.micro_batch=4"]
    small += ["train.global_batch=4", f'data.cache_dir="{train_cache}"']
    plain = train(load_config("lstm-tiny", small), tmp_path / "a", log=lambda *a, **k: None)
    ac = load_config("lstm-tiny", small + ["train.activation_checkpointing=true"])
    assert train(ac, tmp_path / "b", log=lambda *a, **k: None).losses == plain.losses
