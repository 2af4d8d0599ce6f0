"""Every family's incremental decoding state (FamilySpec.decode_state), parametrised over
tests/family_cases.py: a family is checked here the moment it registers a decode state.

- cached decoding equals full recomputation (the model run on the whole sequence) within 1e-5:
  several slots prefilled at once with prompts of different lengths, decode steps with every
  slot at its own position, a slot released and refilled, the last slot moved into a freed one
  (the engine's compaction), a prefill continuing a cached sequence; for the model's own
  modules, the engine's decoding copy (the family's decode_model, prepacked linears), and the
  fixed-shape steps that CUDA graphs record (where the state has them; run eagerly here);
- the per-token cost does not grow with position: the work of one decode step late in a
  sequence against early (FLOPs, and elements produced), a bound that a hidden recomputation
  of the prefix fails;
- the engine over the state (continuous batching through fewer slots than requests) generates
  greedily what the full-recompute loop generates;
- a tensor-parallel shard (tp 2, without sequence parallelism) gives the single process's
  logits once its vocabulary slices are gathered, and the engine on the shards the single
  process's tokens, for each family that runs tensor parallelism.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from family_cases import FAMILY_CASES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import meshlm.inference.linear_ops as linear_ops
from meshlm.config import load_config
from meshlm.distributed.spawn import run_distributed
from meshlm.inference.cuda_graphs import GraphedDecodeState
from meshlm.inference.decoding import Decoder
from meshlm.inference.engine import Engine, Request
from meshlm.inference.sampling import SamplingParams
from meshlm.inference.simple_generate import generate_tokens
from meshlm.model.registry import build_model, family_spec

V, MAX_LEN = 384, 160
BASE = [f"model.vocab_size={V}", f"model.max_seq_len={MAX_LEN}"]
ATOL = 1e-5


def model_config(case: str):
    return load_config(None, BASE + FAMILY_CASES[case]).model


def decoding_cases() -> list[str]:
    return [case for case in FAMILY_CASES if family_spec(model_config(case)).decode_state is not None]


CASES = decoding_cases()
# Families whose decode step computes from the parameters directly (n-gram tables, the HMM
# filter, gcnn's one-column convolution as a matmul, lstm's fused cell) rather than through
# the model's forward, so a hook on the whole model is not run while decoding.
STEP_OUTSIDE_FORWARD = {"maxent", "hmm", "gcnn", "lstm"}


def sequences(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


class Reference:
    """Next-token logits of the model run on a whole sequence, each at most once."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    @torch.no_grad()
    def __call__(self, seq: list[int]) -> torch.Tensor:
        key = tuple(seq)
        if key not in self.memo:
            self.memo[key] = self.model(torch.tensor([seq]))[0, -1]
        return self.memo[key]


def check_against_recompute(state, reference: Reference) -> float:
    """Drive `state` through the engine's moves; returns the largest logit difference."""
    seqs = sequences((40, 33, 27, 30), seed=1)
    worst = 0.0

    def compare(logits, rows_and_lengths):
        nonlocal worst
        for row, (seq, n) in enumerate(rows_and_lengths):
            worst = max(worst, (logits[row] - reference(seq[:n])).abs().max().item())

    # three prompts of different lengths at once, then decode steps at three positions
    lens = [5, 11, 1]
    compare(state.prefill([s[:n] for s, n in zip(seqs, lens)], [0, 1, 2]), zip(seqs, lens))
    for _ in range(6):
        logits = state.decode(torch.tensor([s[n] for s, n in zip(seqs, lens)]))
        lens = [n + 1 for n in lens]
        compare(logits, zip(seqs, lens))
    assert state.lengths[:3] == lens
    # slot 0 finishes: the last slot moves into it (compaction); slot 2 is then free
    state.move_slot(2, 0)
    slots = [seqs[2], seqs[1]]
    lens = [lens[2], lens[1]]
    assert state.lengths[:3] == [*lens, 0]
    # a new sequence is prefilled into the freed slot while the others wait
    state.release(2)
    slots.append(seqs[3])
    lens.append(4)
    compare(state.prefill([seqs[3][:4]], [2]), [(seqs[3], 4)])
    for _ in range(5):
        logits = state.decode(torch.tensor([s[n] for s, n in zip(slots, lens)]))
        lens = [n + 1 for n in lens]
        compare(logits, zip(slots, lens))
    # a prefill that continues cached sequences (several new tokens after a cached prefix)
    compare(
        state.prefill([slots[0][lens[0] : lens[0] + 3], slots[2][lens[2] : lens[2] + 7]], [0, 2]),
        [(slots[0], lens[0] + 3), (slots[2], lens[2] + 7)],
    )
    assert state.lengths[:3] == [lens[0] + 3, lens[1], lens[2] + 7]
    assert isinstance(state.nbytes(), int) and state.nbytes() > 0
    return worst


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_equals_full_recompute(case, monkeypatch):
    cfg = model_config(case)
    model = build_model(cfg, seed=0).eval()
    reference = Reference(model)
    spec = family_spec(cfg)
    worst = check_against_recompute(spec.decode_state(model, 4, 64), reference)
    assert worst < ATOL, f"{case}, the model's own modules: {worst}"
    state = spec.decode_state(model, 4, 64)
    if hasattr(state, "decode_static"):  # CUDA graphs' padded fixed-shape steps, eagerly
        worst = check_against_recompute(GraphedDecodeState(state, "cpu", capture=False), reference)
        assert worst < ATOL, f"{case}, fixed-shape decode steps: {worst}"
    # the engine's copy: decode_model rewrites and every linear (if any) prepacked, the tiny ones too
    if linear_ops.packing_available(torch.device("cpu"), torch.float32):
        monkeypatch.setattr(linear_ops, "PACK_MIN_ELEMENTS", 0)
        decoder = Decoder(model, pack=True)
        if any(isinstance(m, torch.nn.Linear) for m in model.modules()):
            assert any(isinstance(m, linear_ops.PackedLinear) for m in decoder.model.modules())
        worst = check_against_recompute(decoder.new_state(4, 64), reference)
        assert worst < ATOL, f"{case}, the engine's prepacked copy: {worst}"


@pytest.mark.parametrize("case", CASES)
def test_decoding_copy_leaves_the_model_alone_and_keeps_hooks(case, monkeypatch):
    """The engine decodes with a copy of the module tree (fused, prepacked, called directly):
    the model's own modules are untouched, and a module with a hook still runs it."""
    monkeypatch.setattr(linear_ops, "PACK_MIN_ELEMENTS", 0)
    model = build_model(model_config(case), seed=0).eval()
    classes = {name: type(m) for name, m in model.named_modules()}
    prompt = sequences((6,), seed=7)[0]
    with torch.no_grad():
        before = model(torch.tensor([prompt]))[0, -1]
    model.register_forward_hook(lambda module, args, out: out * 2)
    decoder = Decoder(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {id(p) for p in model.parameters()} >= {id(p) for p in decoder.model.parameters() if p.requires_grad}
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([prompt]))[0, -1], 2 * before)
    logits = decoder.new_state(1, 16).prefill([prompt], [0])[0]
    if family_spec(model.cfg).name in STEP_OUTSIDE_FORWARD:
        return
    assert (logits - 2 * before).abs().max().item() < ATOL


class ElementCounter(TorchDispatchMode):
    """Elements of every new tensor an operation produces (views and in-place writes excluded):
    the memory traffic of a step, whatever its operations are."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.elements += t.numel()
        return out


def decode_step_cost(model, spec, position: int) -> tuple[int, int]:
    """(FLOPs, elements produced) of one decode step at `position` (one sequence)."""
    state = spec.decode_state(model, 1, MAX_LEN)
    seq = sequences((position + 1,), seed=3)[0]
    state.prefill([seq[:position]], [0])
    with FlopCounterMode(display=False) as flops, ElementCounter() as elements:
        state.decode(torch.tensor([seq[position]]))
    return flops.get_total_flops(), elements.elements


@pytest.mark.parametrize("case", CASES)
def test_decode_cost_does_not_grow_with_position(case):
    """One step at position 150 against position 10: a recomputation of the prefix would cost
    ~15x; the state may grow only by what it reads (a transformer's attention over its cache)."""
    cfg = model_config(case)
    model = build_model(cfg, seed=0).eval()
    spec = family_spec(cfg)
    early, late = decode_step_cost(model, spec, 10), decode_step_cost(model, spec, 150)
    for what, a, b in zip(("FLOPs", "elements produced"), early, late):
        assert b <= 3 * max(a, 1), f"{case}: {what} per decode step grew from {a} at position 10 to {b} at 150"
    assert early[1] > 0


GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=())


@pytest.mark.parametrize("case", CASES)
def test_engine_greedy_equals_the_recompute_loop(case):
    """Four requests through two slots: finished sequences are replaced mid-run (move_slot,
    release, prefill into a used slot) and every request still gets the tokens of the
    full-recompute reference loop."""
    model = build_model(model_config(case), seed=0).eval()
    prompts = sequences((3, 17, 1, 9), seed=5)
    params = [GREEDY, SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=()), GREEDY, GREEDY]
    got = Engine(model, max_batch=2).generate([Request(p, sp) for p, sp in zip(prompts, params)])
    for prompt, sp, completion in zip(prompts, params, got):
        assert completion.token_ids == list(generate_tokens(model, prompt, sp.max_new_tokens, temperature=0))


def _tp_case(rank: int, cases: list[str]) -> dict[str, float]:
    from meshlm.parallel.tensor_parallel import apply_tensor_parallel
    from meshlm.parallel.vocab_parallel import gather_vocab_logits

    group = dist.group.WORLD
    linear_ops.PACK_MIN_ELEMENTS = 0  # (a forked rank of its own) the tiny shards are prepacked too
    worst = {}
    for case in cases:
        cfg = model_config(case)
        full = build_model(cfg, seed=0).eval()
        shard = build_model(cfg, seed=0).eval()
        apply_tensor_parallel(shard, group)
        spec = family_spec(cfg)
        reference = spec.decode_state(full, 2, 32)
        # the shard's own modules, and the engine's copy (row-parallel prepacked layers all-reduce)
        states = [spec.decode_state(shard, 2, 32)]
        if linear_ops.packing_available(torch.device("cpu"), torch.float32):
            states.append(Decoder(shard, pack=True).new_state(2, 32))
        seqs = sequences((20, 14), seed=4)
        diff = 0.0
        for step in range(4):
            if step == 0:
                run = lambda state: state.prefill([seqs[0][:9], seqs[1][:3]], [0, 1])  # noqa: E731
            else:
                tokens = torch.tensor([seqs[0][8 + step], seqs[1][2 + step]])
                run = lambda state: state.decode(tokens)  # noqa: E731
            x = run(reference)
            for state in states:
                y = run(state)
                assert y.shape[-1] == shard.tensor_parallel.padded_vocab_size // 2  # local logits
                diff = max(diff, (x - gather_vocab_logits(y, group, cfg.vocab_size)).abs().max().item())
        worst[case] = diff
        # the engine on the shards: the single process's tokens (greedy), on every rank
        requests = [Request(p, GREEDY) for p in sequences((4, 13, 7), seed=6)]
        single = Engine(full, max_batch=2).generate(requests)
        sharded = Engine(shard, max_batch=2, tp_group=group).generate(requests)
        assert [c.token_ids for c in sharded] == [c.token_ids for c in single], case
    return worst


def test_tensor_parallel_decode_state_equals_single_process():
    cases = [c for c in CASES if family_spec(model_config(c)).capabilities.tensor_parallel is None]
    if not cases:
        pytest.skip("no registered family runs tensor parallelism")
    for worst in run_distributed(_tp_case, 2, cases):
        for case, diff in worst.items():
            assert diff < ATOL, f"{case}: tp2 logits differ by {diff}"
