"""Task heads over a backbone's hidden states, and the CRF's algorithms.

Every head maps hidden states (B, T, d) to per-position scores (B, T, L); what turns them into
predictions lives with the objective (tasks/objective.py) and the decoder (tasks/decode.py):

    ClassificationHead   L class scores per position; the example's scores are their mean over
                         the text's positions (or the last one). The head is linear, so the
                         mean of its scores is exactly the head applied to the mean hidden
                         state (mean pooling), and pooling needs no mask inside the model:
                         the mask travels with the targets to the pipeline's last stage.
    TaggingHead          L tag scores per position; a word's tag is read at its first subword.
    CRFTaggingHead       the same emission scores, followed by the CRF's parameters as L + 2
                         extra rows (start scores, end scores, the L x L transition matrix),
                         so the loss and Viterbi decoding get them through the one output
                         tensor a pipeline stage returns: (B, T + 2 + L, L).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    def __init__(self, d: int, n_labels: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.proj = nn.Linear(d, n_labels)

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        nn.init.normal_(self.proj.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(F.dropout(h, self.dropout, self.training))  # (B, T, L)


class TaggingHead(ClassificationHead):
    pass


class CRFTaggingHead(TaggingHead):
    def __init__(self, d: int, n_labels: int, dropout: float):
        super().__init__(d, n_labels, dropout)
        self.start = nn.Parameter(torch.empty(n_labels))
        self.end = nn.Parameter(torch.empty(n_labels))
        self.transitions = nn.Parameter(torch.empty(n_labels, n_labels))  # [from, to]

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        super().reset_parameters(generator)
        for p in (self.start, self.end, self.transitions):
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        emissions = super().forward(h)  # (B, T, L)
        B, L = emissions.shape[0], emissions.shape[-1]
        extra = torch.cat([self.start[None], self.end[None], self.transitions], dim=0)  # (2 + L, L)
        return torch.cat([emissions, extra.unsqueeze(0).expand(B, 2 + L, L).to(emissions.dtype)], dim=1)


def split_crf_output(output: torch.Tensor, T: int):
    """(B, T + 2 + L, L) -> emissions (B, T, L), start (L,), end (L,), transitions (L, L)."""
    return output[:, :T], output[0, T], output[0, T + 1], output[0, T + 2 :]


def compact(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where `mask` holds, moved to the front of each row: scores (B, T, ...) ->
    (B, W, ...) and the new mask (B, W), W = the most such positions in a row (a word sequence
    read at each word's first subword)."""
    counts = mask.sum(1)
    W = max(int(counts.max()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :W]  # masked positions first, in order
    index = order.view(*order.shape, *([1] * (scores.dim() - 2))).expand(-1, -1, *scores.shape[2:])
    return scores.gather(1, index), torch.arange(W, device=mask.device)[None] < counts[:, None]


def crf_nll(emissions, start, end, transitions, tags, mask) -> torch.Tensor:
    """Negative log-likelihood of each tag sequence under a linear-chain CRF (B,); emissions
    (B, W, L), tags (B, W), mask (B, W) with each row's positions first. Rows without a position
    cost 0."""
    B, W, L = emissions.shape
    tags = tags.clamp(min=0)
    maskf = mask.to(emissions.dtype)
    rows = torch.arange(B, device=emissions.device)
    # Score of the gold path.
    gold = start[tags[:, 0]] + emissions[rows, 0, tags[:, 0]]
    for t in range(1, W):
        step = transitions[tags[:, t - 1], tags[:, t]] + emissions[rows, t, tags[:, t]]
        gold = gold + step * maskf[:, t]
    last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0)[:, None]).squeeze(1)
    gold = gold + end[last]
    # Log partition function (forward algorithm).
    alpha = start[None] + emissions[:, 0]  # (B, L)
    for t in range(1, W):
        nxt = torch.logsumexp(alpha[:, :, None] + transitions[None] + emissions[:, t, None, :], dim=1)
        alpha = torch.where(mask[:, t, None], nxt, alpha)
    log_z = torch.logsumexp(alpha + end[None], dim=1)
    return (log_z - gold) * (mask[:, 0]).to(emissions.dtype)


@torch.no_grad()
def viterbi(emissions, start, end, transitions, mask) -> list[list[int]]:
    """The best tag sequence of each row (its masked positions only)."""
    B, W, L = emissions.shape
    score = start[None] + emissions[:, 0]
    history = []
    for t in range(1, W):
        total = score[:, :, None] + transitions[None]  # (B, from, to)
        best, idx = total.max(dim=1)
        nxt = best + emissions[:, t]
        history.append(idx)
        score = torch.where(mask[:, t, None], nxt, score)
    score = score + end[None]
    lengths = mask.sum(1).tolist()
    out = []
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            out.append([])
            continue
        tag = int(score[b].argmax())
        path = [tag]
        for t in range(n - 1, 0, -1):
            tag = int(history[t - 1][b, tag])
            path.append(tag)
        out.append(path[::-1])
    return out
