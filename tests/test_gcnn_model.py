"""The gated CNN family on one device and on a tensor-parallel pair: parameter and FLOP formulas
against the built model, causality and the receptive field, the rolling-buffer decode state
against full recomputation (one process and tp2), and a per-token decode cost that does not
grow with the position."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from meshlm.config import load_config
from meshlm.distributed.spawn import run_distributed
from meshlm.model.registry import build_model, family_spec, meta_model

V = 97
SMALL = ['model.family="gcnn"', f"model.vocab_size={V}", "model.max_seq_len=256", "data.seq_len=32"]
SHAPES = {
    # plain blocks, convolution as wide as the residual stream, untied output
    "plain": ["model.d_model=32", "model.n_layers=3", "model.kernel_size=3"],
    # bottleneck blocks with their own channel count, tied output
    "bottleneck": [
        "model.d_model=32",
        "model.n_layers=2",
        "model.kernel_size=4",
        "model.bottleneck=16",
        "model.channels=24",
        "model.tie_embeddings=true",
    ],
    # kernel 1: no past at all (an empty buffer), wide channels
    "pointwise": ["model.d_model=16", "model.n_layers=2", "model.kernel_size=1", "model.channels=40"],
}
DECODE_TOL = 1e-5


def model_cfg(shape: str, *extra: str):
    return load_config(None, SMALL + SHAPES[shape] + list(extra)).model


def random_model(cfg, seed=0):
    """A model whose logits vary strongly with the input (the default init gives near-uniform
    ones, which would make the decode comparisons weak)."""
    model = build_model(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def tokens(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parameter_count_and_flops_match_the_built_model(shape):
    cfg = model_cfg(shape)
    spec = family_spec(cfg)
    model = build_model(cfg, seed=0)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied matrix counts once
    assert spec.count_params(cfg) == sum(unique.values())
    assert sum(p.numel() for p in meta_model(cfg).parameters()) == sum(unique.values())
    assert spec.n_blocks(cfg) == cfg.n_layers == len(model.layers)
    # FLOPs per token, counted by torch: forward, and forward + backward (every matmul's input
    # depends on a parameter, so backward computes both gradients: exactly twice the forward)
    B, T = 2, 24
    x = tokens(B, T)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as training:
        model(x).sum().backward()
    assert forward.get_total_flops() == spec.flops_per_token(cfg, T, training=False) * B * T
    assert training.get_total_flops() == spec.flops_per_token(cfg, T, training=True) * B * T
    costs = spec.stage_costs(cfg)
    assert len(costs.blocks) == cfg.n_layers and costs.last == V * cfg.d_model


def test_meta_build_equals_eager_build_and_init_scales_the_residual_projection():
    cfg = model_cfg("bottleneck")
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    torch.manual_seed(0)
    eager = type(a)(cfg)
    eager.init_weights(torch.Generator().manual_seed(3))
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(p, q) and torch.equal(p, r), name
    assert a.output.weight is a.tok_embeddings.weight  # tied after the meta build
    std = cfg.init_std
    assert a.layers["0"].glu.conv_a.weight.std().item() == pytest.approx(std, rel=0.1)
    assert a.layers["0"].glu.proj.weight.std().item() == pytest.approx(std / (2 * cfg.n_layers) ** 0.5, rel=0.15)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("shape", ["plain", "bottleneck"])
def test_each_position_sees_exactly_its_receptive_field(shape):
    """Changing token s changes the logits at t exactly when 0 <= t - s < receptive field."""
    cfg = model_cfg(shape)
    model = random_model(cfg)
    x = tokens(1, 20)
    field = cfg.receptive_field
    with torch.no_grad():
        base = model(x)
        for s in (0, 5, 11):
            y = x.clone()
            y[0, s] = (y[0, s] + 1) % V
            changed = (model(y) - base).abs().amax(dim=-1)[0] > 0  # (T,)
            want = torch.tensor([0 <= t - s < field for t in range(20)])
            assert torch.equal(changed, want), (s, changed)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rolling_buffer_decode_equals_full_recomputation(shape):
    """Prompts of different lengths into scattered slots, teacher-forced decode, a slot freed
    and compacted (move_slot), a fresh prompt into a reused slot, and a second prompt appended
    to a running sequence: every logit equals the full forward of that sequence."""
    cfg = model_cfg(shape)
    model = random_model(cfg)
    spec = family_spec(cfg)
    seqs = {name: tokens(40, seed=i).tolist() for i, name in enumerate("abcd")}
    with torch.no_grad():
        full = {name: model(torch.tensor([s]))[0] for name, s in seqs.items()}  # (40, V)
    state = spec.decode_state(model, 4, 64)
    worst = 0.0

    def check(logits, name, pos):
        nonlocal worst
        worst = max(worst, (logits - full[name][pos]).abs().max().item())

    # slot j holds sequence at[j]; pos[name] = tokens of it consumed so far
    at, pos = ["c", "a", "b"], {"a": 7, "b": 1, "c": 12}
    out = state.prefill([seqs["a"][:7], seqs["b"][:1], seqs["c"][:12]], [1, 2, 0])
    for row, name in enumerate(["a", "b", "c"]):
        check(out[row], name, pos[name] - 1)
    for step in range(30):
        if step == 10:  # "a" (slot 1) finishes: the last slot moves into its place
            state.release(1)
            state.move_slot(2, 1)
            at = ["c", "b"]
        if step == 15:  # "d" starts in the freed slot, whose buffer still holds "b"'s inputs
            check(state.prefill([seqs["d"][:5]], [2])[0], "d", 4)
            at, pos["d"] = ["c", "b", "d"], 5
        if step == 20:  # "b" receives a second prompt, appended to what it holds
            check(state.prefill([seqs["b"][pos["b"] : pos["b"] + 3]], [1])[0], "b", pos["b"] + 2)
            pos["b"] += 3
        if any(pos[name] >= 40 for name in at):
            break
        out = state.decode(torch.tensor([seqs[name][pos[name]] for name in at]))
        for row, name in enumerate(at):
            check(out[row], name, pos[name])
            pos[name] += 1
    assert state.lengths[: len(at)] == [pos[name] for name in at]
    assert state.lengths[len(at) :] == [0] * (4 - len(at))
    assert worst <= DECODE_TOL, worst


def test_decode_cost_and_memory_do_not_grow_with_position():
    """One decode step costs the model's forward FLOPs for one token per slot, at position 3
    as at position 200 (an incremental state, not a hidden recomputation), and the state's
    memory does not depend on max_len."""
    cfg = model_cfg("bottleneck")
    spec = family_spec(cfg)
    model = random_model(cfg)
    state = spec.decode_state(model, 2, 256)
    state.prefill([tokens(2).tolist(), tokens(3, seed=1).tolist()], [0, 1])
    costs = {}
    for step in range(200):
        if step in (1, 199):
            with FlopCounterMode(display=False) as counter:
                state.decode(tokens(2, seed=step))
            costs[state.lengths[0]] = counter.get_total_flops()
        else:
            state.decode(tokens(2, seed=step))
    assert list(costs) == [4, 202]
    assert costs[4] == costs[202] == 2 * spec.flops_per_token(cfg, 1, training=False)
    assert spec.decode_state(model, 2, 4096).nbytes() == state.nbytes() > 0


def test_fixed_shape_step_is_the_decode_step_without_lengths():
    """decode_static (what CUDA graphs record) computes decode's logits and buffers and leaves
    `lengths` to the caller."""
    cfg = model_cfg("plain")
    spec = family_spec(cfg)
    model = random_model(cfg)
    a, b = spec.decode_state(model, 3, 32), spec.decode_state(model, 3, 32)
    prompts = [tokens(5, seed=1).tolist(), tokens(2, seed=2).tolist()]
    a.prefill(prompts, [0, 1]), b.prefill(prompts, [0, 1])
    x = tokens(2, seed=3)
    assert torch.equal(a.decode(x), b.decode_static(x, torch.tensor([5, 2])))
    assert torch.equal(a.past, b.past)
    assert a.lengths == [6, 3, 0] and b.lengths == [5, 2, 0]


def test_decode_state_refuses_pipeline_stages_and_empty_prompts():
    cfg = model_cfg("plain")
    spec = family_spec(cfg)
    model = build_model(cfg, seed=0)
    state = spec.decode_state(model, 2, 16)
    with pytest.raises(ValueError, match="non-empty prompt"):
        state.prefill([[1, 2], []], [0, 1])
    model.output = None
    with pytest.raises(ValueError, match="whole model"):
        spec.decode_state(model, 2, 16)


# ----------------------------------------------------------------------------- tensor parallel


def _tp_decode(rank: int, shape: str):
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel
    from meshlm.parallel.vocab_parallel import gather_vocab_logits

    cfg = model_cfg(shape)
    spec = family_spec(cfg)
    full = random_model(cfg)
    shard = random_model(cfg)
    apply_tensor_parallel(shard, dist.group.WORLD)
    prompts = [tokens(9, seed=1).tolist(), tokens(4, seed=2).tolist()]
    a, b = spec.decode_state(full, 2, 64), spec.decode_state(shard, 2, 64)
    worst = (a.prefill(prompts, [0, 1]) - gather_vocab_logits(b.prefill(prompts, [0, 1]), dist.group.WORLD, V)).abs()
    worst = worst.max().item()
    for step in range(12):
        x = tokens(2, seed=10 + step)
        got = gather_vocab_logits(b.decode(x), dist.group.WORLD, V)
        worst = max(worst, (a.decode(x) - got).abs().max().item())
    return worst, b.nbytes() == a.nbytes()


@pytest.mark.parametrize("shape", ["plain", "bottleneck"])
def test_tensor_parallel_decode_equals_single_process(shape):
    """A tp2 shard (each rank half the channels of both GLU halves, half the vocabulary)
    decodes the same logits as the whole model; each rank keeps the whole (replicated) buffer."""
    for worst, same_bytes in run_distributed(_tp_decode, 2, shape):
        assert worst <= DECODE_TOL, worst
        assert same_bytes
