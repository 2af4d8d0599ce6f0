"""A hidden Markov language model on one device, computed in log space and batched over sequences.

    z_0 ~ pi,   z_t | z_{t-1} ~ A[z_{t-1}],   x_t | z_t ~ E[z_t]        (S states, V tokens)

The parameters are unnormalised log-probabilities (logits): pi = softmax(initial),
A = softmax(transition) row-wise, E = softmax(emission) row-wise, so gradient training is
unconstrained, and EM's M-step writes normalised log-probabilities into the same tensors.

The forward algorithm (`forward_filter`) runs the filter of the scaled forward recursion
(Rabiner 1989): per position, one matrix product (B, S) x (S, S) and a normalisation, the
emission probabilities shifted by their maximum over states; the log normalisers sum to the
log-likelihood. As a language model the HMM predicts the next token from the filtered state
distribution pushed one step through A: logits (B, T, V) = log(pred (B, T, S) @ E), whose
cross-entropy sums, over a window, to the negative log-likelihood of the window's tokens
after the first given the first: exact next-token probabilities, no sampled states.

Module layout (the family spec's contract):

    emission     Emission: weight (S, V)                   a `vocab_columns` table under tp
    chain        nn.ModuleDict {"0": MarkovChain}:          the one repeated block
                 initial (S,), transition (S, S)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.hmm.config import HMMConfig
from meshlm.model.vocab_ops import LOCAL_VOCAB_OPS


def scaled_emissions(log_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | s) (..., S) -> (exp(log_e - m), m) with m the maximum over states (0 where a
    token is impossible in every state), so the largest scaled emission is 1."""
    m = log_e.max(dim=-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (log_e - m).exp(), m.squeeze(-1)


def filter_step(prior: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One observation: prior p(z_t | x_<t) (B, S) and scaled emissions e (B, S) -> the filtered
    p(z_t | x_<=t) (B, S) and the scaled normaliser c (B,). An impossible token (c = 0) leaves
    the prior as it was rather than dividing by zero."""
    alpha = prior * e  # (B, S)
    c = alpha.sum(dim=-1)  # (B,)
    ok = c > 0
    filtered = torch.where(ok.unsqueeze(-1), alpha / torch.where(ok, c, 1.0).unsqueeze(-1), prior)
    return filtered, c


def forward_filter(
    prior: torch.Tensor, A: torch.Tensor, log_e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward algorithm over a batch: prior (B, S) for the first position, A (S, S),
    log_e (B, T, S). Returns the filtered distributions (B, T, S), the one-step-ahead ones
    pred_t = filtered_t A (B, T, S), and log p(x_t | x_<t) (B, T) (its sum: the log-likelihood)."""
    e, m = scaled_emissions(log_e)
    filtered, preds, log_c = [], [], []
    for t in range(log_e.shape[1]):
        f, c = filter_step(prior, e[:, t])
        prior = f @ A  # (B, S)
        filtered.append(f)
        preds.append(prior)
        log_c.append(c.log() + m[:, t])
    return torch.stack(filtered, 1), torch.stack(preds, 1), torch.stack(log_c, 1)


class Emission(nn.Module):
    """Each state's distribution over the vocabulary, as logits (S, V)."""

    def __init__(self, n_states: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_states, vocab_size))
        self.vocab_ops = LOCAL_VOCAB_OPS

    def log_normaliser(self) -> torch.Tensor:
        return self.vocab_ops.logsumexp(self.weight)  # (S,)

    def log_probs(self) -> torch.Tensor:
        """log E (S, V_local), normalised over the whole vocabulary. The normaliser is replicated
        but used here on this rank's columns only: `enter` sums its gradient over the ranks."""
        return self.weight - self.vocab_ops.enter(self.log_normaliser()).unsqueeze(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(x | s) of each token: tokens (...) -> (..., S)."""
        return self.vocab_ops.select(self.weight, tokens) - self.log_normaliser()

    def predictive_logits(self, pred: torch.Tensor) -> torch.Tensor:
        """log sum_s pred[s] E[s, v]: pred (..., S) state probabilities -> (..., V_local). Each
        column is shifted by its maximum over states (exact; it keeps exp from underflowing)."""
        log_e = self.log_probs()  # (S, V)
        shift = log_e.detach().max(dim=0).values
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # (V,)
        return torch.log(self.vocab_ops.enter(pred) @ (log_e - shift).exp()) + shift


class MarkovChain(nn.Module):
    """The hidden chain: initial and transition logits; its forward is the forward algorithm."""

    def __init__(self, n_states: int):
        super().__init__()
        self.initial = nn.Parameter(torch.empty(n_states))
        self.transition = nn.Parameter(torch.empty(n_states, n_states))

    def start(self, batch: int) -> torch.Tensor:
        """pi for `batch` sequences: (batch, S)."""
        return F.softmax(self.initial, dim=-1).expand(batch, -1)

    def transition_probs(self) -> torch.Tensor:
        return F.softmax(self.transition, dim=-1)  # (S, S), rows sum to 1

    def forward(self, log_e: torch.Tensor, prior: torch.Tensor | None = None):
        """log_e (B, T, S) -> (filtered, pred, log p(x_t | x_<t)), see forward_filter; the
        first position's prior is pi unless given."""
        prior = self.start(log_e.shape[0]) if prior is None else prior
        return forward_filter(prior, self.transition_probs(), log_e)


class HMMLM(nn.Module):
    def __init__(self, cfg: HMMConfig):
        super().__init__()
        self.cfg = cfg
        self.emission = Emission(cfg.n_states, cfg.vocab_size)
        self.chain = nn.ModuleDict({"0": MarkovChain(cfg.n_states)})

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for p in self.parameters():
            if not p.is_meta:
                nn.init.normal_(p, std=self.cfg.init_std, generator=generator)

    def tie_weights(self) -> None:
        pass

    def reset_buffers(self) -> None:
        pass

    def log_likelihood(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(x_0, ..., x_{T-1}) of each sequence: tokens (B, T) -> (B,)."""
        _, _, log_c = self.chain["0"](self.emission(tokens))
        return log_c.sum(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V): log p(x_{t+1} = v | x_<=t)."""
        _, pred, _ = self.chain["0"](self.emission(tokens))  # (B, T, S)
        return self.emission.predictive_logits(pred)

    @torch.no_grad()
    def viterbi(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable state sequence of each sequence (max-product in log space):
        tokens (B, T) -> (states (B, T) int64, their joint log-probability with the tokens (B,))."""
        chain = self.chain["0"]
        log_e = self.emission(tokens)  # (B, T, S)
        log_A = F.log_softmax(chain.transition, dim=-1)  # (S, S)
        score = F.log_softmax(chain.initial, dim=-1) + log_e[:, 0]  # (B, S)
        back = []
        for t in range(1, tokens.shape[1]):
            best, arg = (score.unsqueeze(-1) + log_A).max(dim=1)  # over the previous state: (B, S)
            score = best + log_e[:, t]
            back.append(arg)
        total, state = score.max(dim=-1)
        path = [state]
        for arg in reversed(back):
            state = arg.gather(1, state.unsqueeze(1)).squeeze(1)
            path.append(state)
        return torch.stack(path[::-1], dim=1), total
