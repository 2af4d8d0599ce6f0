"""Baum-Welch for the HMM language model: the E-step's expected counts of a batch of sequences
and the M-step from summed counts (the EMHooks of the family spec; the trainer's EM runner sums
the counts over data-parallel ranks between the two).

E-step (Rabiner 1989, with scaling): the forward filter gives the filtered distributions
alpha_t = p(z_t | x_<=t) and the scaled normalisers c_t; the backward pass
beta_t = A (e_{t+1} * beta_{t+1}) / c_{t+1} with the same scaling; then

    gamma_t(s)   = alpha_t(s) beta_t(s)                                  p(z_t = s | x)
    xi_t(i, j)   = alpha_t(i) A_ij e_{t+1}(j) beta_{t+1}(j) / c_{t+1}    p(z_t = i, z_{t+1} = j | x)

summed over positions and sequences: initial counts sum_b gamma_0, transition counts
A * (alpha_{:-1}^T (e beta / c)_{1:}) (one matrix product for the whole batch), emission
counts gamma scattered onto the tokens. Per-batch sums are returned in float64, so that adding
them up over batches and ranks in any order gives the same totals to ~1e-15.

M-step with add-k smoothing: theta = (counts + k) / row total, the MAP estimate under a
symmetric Dirichlet(k + 1) prior, whose log density (up to a constant) is k * sum log theta:
EM's objective is then log-likelihood + log prior, and it never decreases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshlm.model.hmm.model import HMMLM, filter_step, scaled_emissions


def log_parameters(model: HMMLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised log pi (S,), log A (S, S), log E (S, V)."""
    chain = model.chain["0"]
    return (
        F.log_softmax(chain.initial, dim=-1),
        F.log_softmax(chain.transition, dim=-1),
        F.log_softmax(model.emission.weight, dim=-1),
    )


@torch.no_grad()
def expected_counts(model: HMMLM, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sufficient statistics of a batch tokens (B, T): {"initial" (S,), "transition" (S, S),
    "emission" (S, V), "log_likelihood" (), "tokens" ()}, float64."""
    log_pi, log_A, log_E = log_parameters(model)
    A = log_A.exp()
    B, T = tokens.shape
    S = A.shape[0]
    e, m = scaled_emissions(F.embedding(tokens, log_E.t()))  # (B, T, S), (B, T)

    prior = log_pi.exp().expand(B, S)
    alpha = torch.empty(B, T, S, dtype=e.dtype, device=e.device)
    c = torch.empty(B, T, dtype=e.dtype, device=e.device)
    for t in range(T):
        alpha[:, t], c[:, t] = filter_step(prior, e[:, t])
        prior = alpha[:, t] @ A
    # beta_t scaled by the same c: beta_{T-1} = 1, beta_{t-1} = A r_t with r_t = e_t beta_t / c_t.
    beta = torch.empty_like(alpha)
    ratio = torch.empty_like(alpha)  # r_t (r_0 unused)
    beta[:, T - 1] = 1.0
    safe_c = torch.where(c > 0, c, 1.0)
    for t in range(T - 1, 0, -1):
        ratio[:, t] = e[:, t] * beta[:, t] / safe_c[:, t].unsqueeze(-1)
        beta[:, t - 1] = ratio[:, t] @ A.t()
    gamma = alpha * beta  # (B, T, S)

    transition = A * (alpha[:, :-1].reshape(-1, S).t() @ ratio[:, 1:].reshape(-1, S))  # (S, S)
    emission = torch.zeros(log_E.shape[1], S, dtype=torch.float64, device=e.device)
    emission.index_add_(0, tokens.reshape(-1), gamma.reshape(-1, S).double())
    return {
        "initial": gamma[:, 0].double().sum(0),
        "transition": transition.double(),
        "emission": emission.t().contiguous(),
        "log_likelihood": (c.double().log() + m.double()).sum(),
        "tokens": torch.tensor(float(tokens.numel()), dtype=torch.float64, device=e.device),
    }


def _normalised_log(counts: torch.Tensor, k: float, old: torch.Tensor) -> torch.Tensor:
    """log((counts + k) / row total); a row with no counts at all keeps its old values."""
    smoothed = counts + k
    total = smoothed.sum(dim=-1, keepdim=True)
    new = (smoothed / torch.where(total > 0, total, 1.0)).log()
    return torch.where(total > 0, new, old.double())


@torch.no_grad()
def m_step(model: HMMLM, counts: dict[str, torch.Tensor], smoothing: float) -> None:
    log_pi, log_A, log_E = log_parameters(model)
    chain = model.chain["0"]
    chain.initial.copy_(_normalised_log(counts["initial"], smoothing, log_pi))
    chain.transition.copy_(_normalised_log(counts["transition"], smoothing, log_A))
    model.emission.weight.copy_(_normalised_log(counts["emission"], smoothing, log_E))


@torch.no_grad()
def log_prior(model: HMMLM, smoothing: float) -> float:
    """k * sum of every log-probability: the log density of the Dirichlet(k + 1) prior up to a constant."""
    if smoothing == 0:
        return 0.0
    return smoothing * sum(float(p.double().sum()) for p in log_parameters(model))
