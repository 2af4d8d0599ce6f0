"""The maxent and hmm families on one process: the forward algorithm, Baum-Welch's expected
counts and Viterbi against brute-force enumeration, the HMM's next-token loss against the
chain rule, and cached decoding against full recomputation for both families."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from meshlm.config import ConfigError, load_config
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.model.hmm import em
from meshlm.model.registry import build_model, family_spec


def _hmm(S=3, V=5, seed=0):
    cfg = load_config(None, ['model.family="hmm"', f"model.n_states={S}", f"model.vocab_size={V}"])
    return build_model(cfg.model, seed=seed).double()


def _probabilities(model):
    chain = model.chain["0"]
    return (
        F.softmax(chain.initial, -1).detach(),
        F.softmax(chain.transition, -1).detach(),
        F.softmax(model.emission.weight, -1).detach(),
    )


def _enumerate(model, x):
    """Every state path of one sequence x (T,) with its joint probability p(z, x)."""
    pi, A, E = _probabilities(model)
    S = pi.shape[0]
    for z in itertools.product(range(S), repeat=len(x)):
        p = pi[z[0]] * E[z[0], x[0]]
        for t in range(1, len(x)):
            p = p * A[z[t - 1], z[t]] * E[z[t], x[t]]
        yield z, float(p)


TOKENS = torch.tensor([[1, 4, 0, 2], [3, 3, 1, 0], [2, 2, 2, 2]])


def test_forward_algorithm_equals_brute_force_enumeration():
    model = _hmm()
    got = model.log_likelihood(TOKENS).detach()
    for b, x in enumerate(TOKENS.tolist()):
        want = math.log(sum(p for _, p in _enumerate(model, x)))
        assert math.isclose(float(got[b]), want, rel_tol=1e-12), (b, float(got[b]), want)


def test_next_token_loss_is_the_chain_rule():
    """The LM loss of a window sums to -log p(x_1..x_{T-1} | x_0): the exact marginal likelihood."""
    model = _hmm()
    pi, _, E = _probabilities(model)
    loss = F.cross_entropy(model(TOKENS)[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten(), reduction="none")
    first = torch.log(pi @ E[:, TOKENS[:, 0]])  # log p(x_0)
    want = -(model.log_likelihood(TOKENS) - first)
    torch.testing.assert_close(loss.view(3, -1).sum(1), want.detach(), rtol=1e-12, atol=0)


def test_expected_counts_equal_brute_force_posteriors():
    model = _hmm()
    counts = em.expected_counts(model, TOKENS)
    S, V = 3, 5
    initial, transition, emission = torch.zeros(S), torch.zeros(S, S), torch.zeros(S, V)
    log_likelihood = 0.0
    for x in TOKENS.tolist():
        paths = list(_enumerate(model, x))
        total = sum(p for _, p in paths)
        log_likelihood += math.log(total)
        for z, p in paths:
            w = p / total
            initial[z[0]] += w
            for t in range(len(x)):
                emission[z[t], x[t]] += w
                if t:
                    transition[z[t - 1], z[t]] += w
    assert math.isclose(float(counts["log_likelihood"]), log_likelihood, rel_tol=1e-12)
    for name, want in (("initial", initial), ("transition", transition), ("emission", emission)):
        torch.testing.assert_close(counts[name].float(), want, rtol=1e-5, atol=1e-6, msg=name)
    assert float(counts["tokens"]) == TOKENS.numel()


def test_m_step_with_smoothing_normalises_and_em_never_decreases_the_objective():
    torch.manual_seed(0)
    model = _hmm(S=4, V=6, seed=1)
    x = torch.randint(0, 6, (5, 12))
    previous = -math.inf
    for _ in range(6):
        counts = em.expected_counts(model, x)
        objective = float(counts["log_likelihood"]) + em.log_prior(model, 0.5)
        assert objective >= previous - 1e-9
        previous = objective
        em.m_step(model, counts, 0.5)
        for p in _probabilities(model):
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    pi, A, E = _probabilities(model)
    torch.testing.assert_close(E[0] * 0 + (counts["emission"][0] + 0.5) / (counts["emission"][0] + 0.5).sum(), E[0])


def test_viterbi_equals_brute_force_argmax():
    model = _hmm()
    paths, scores = model.viterbi(TOKENS)
    for b, x in enumerate(TOKENS.tolist()):
        z, p = max(_enumerate(model, x), key=lambda item: item[1])
        assert tuple(paths[b].tolist()) == z
        assert math.isclose(float(scores[b]), math.log(p), rel_tol=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [
        ['model.family="maxent"', "model.order=4", "model.hash_rows=64", "model.init_std=0.5"],
        ['model.family="hmm"', "model.n_states=8"],
    ],
    ids=["maxent", "hmm"],
)
def test_cached_decoding_equals_recomputation(overrides):
    """Prefill two prompts of different lengths, decode 6 tokens, move a slot, release one: the
    logits equal the full model's on the whole sequence at every step."""
    cfg = load_config(None, [*overrides, "model.vocab_size=40", "model.max_seq_len=64", "data.seq_len=32"])
    model = build_model(cfg.model, seed=3).eval()
    state = family_spec(cfg).decode_state(model, 3, 64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (5, 2)]
    logits = state.prefill(seqs, [0, 1])

    def check(logits, seqs):
        with torch.no_grad():
            for i, seq in enumerate(seqs):
                full = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(logits[i], full, rtol=1e-5, atol=1e-5)

    check(logits, seqs)
    for _ in range(6):
        nxt = torch.randint(0, 40, (len(seqs),), generator=g)
        seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
        check(state.decode(nxt), seqs)
    assert state.lengths[:2] == [len(s) for s in seqs]
    state.move_slot(1, 0)  # sequence 0 finished: the last active one moves into its slot
    state.release(1)
    assert state.lengths[:2] == [len(seqs[1]), 0]
    seqs = [seqs[1]]
    for _ in range(2):
        nxt = torch.randint(0, 40, (1,), generator=g)
        seqs = [seqs[0] + [int(nxt)]]
        check(state.decode(nxt), seqs)
    assert state.nbytes() > 0


def test_training_methods_are_checked_before_launch():
    base = ["model.vocab_size=64"]
    with pytest.raises(ConfigError, match="model.family 'transformer' has none"):
        parallel_dims_from_config(load_config(None, [*base, 'train.optimizer="em"']), 1)
    with pytest.raises(ConfigError, match="data-parallel ranks only"):
        load_config(None, [*base, 'model.family="hmm"', 'train.optimizer="em"', "parallel.tp=2"])
    with pytest.raises(ConfigError, match="data-parallel ranks only"):
        load_config(None, [*base, 'model.family="maxent"', 'train.optimizer="lbfgs"', "parallel.zero=1"])
    with pytest.raises(ConfigError, match="AdamW's moments"):
        load_config(None, [*base, 'model.family="maxent"', 'train.optimizer="sgd"', "parallel.zero=2"])
    with pytest.raises(ConfigError, match="model.order"):
        load_config(None, [*base, 'model.family="maxent"', "model.order=1"])
    for family in ("maxent", "hmm"):
        with pytest.raises(ConfigError, match=f"model.family '{family}' cannot run pipeline.*It can run data parallel"):
            parallel_dims_from_config(load_config(None, [*base, f'model.family="{family}"', "parallel.pp=2"]), 2)


def test_eval_perplexity_is_the_forward_algorithms_likelihood():
    """`meshlm eval`'s windows through the generic next-token path give, for an HMM, exactly
    -(log p(window) - log p(first token)) summed over the windows: the marginal likelihood."""
    from meshlm.inference.evaluate import evaluate_tokens, windows

    model = _hmm(S=4, V=7, seed=2)
    tokens = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    result = evaluate_tokens(model, tokens, seq_len=8, batch_size=2)
    pi, _, E = _probabilities(model)
    total = 0.0
    with torch.no_grad():
        for start, length in windows(len(tokens), 8):
            window = tokens[start : start + length + 1].unsqueeze(0)
            total -= float(model.log_likelihood(window)[0] - torch.log(pi @ E[:, window[0, 0]]))
    assert result.tokens == 49
    assert math.isclose(result.loss, total / 49, rel_tol=1e-6)  # the eval path computes in float32
    assert math.isclose(result.perplexity, math.exp(total / 49), rel_tol=1e-6)
