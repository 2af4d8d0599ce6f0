"""Turning logits into the next token: greedy, temperature, top-k, top-p (nucleus) and a
repetition penalty; per-request parameters and seeds for the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from meshlm.data.tokenizer import EOT_ID


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, vocab) -> (B,) token ids. Temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- engine sampling
# The engine samples a whole batch at once, each row with its own parameters and its own
# random generator, so a request's output depends only on its own seed, never on what else
# is in the batch.


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. temperature 0 = greedy (argmax).

    repetition_penalty: > 1 discourages tokens already in the prompt or the output (CTRL /
    Hugging Face rule: positive logits divided by it, negative ones multiplied).
    stop: strings that end the output (the text is cut before the stop string).
    stop_token_ids: token ids that end the output (not part of the text); by default the
    end-of-text token that separates documents in meshlm's training data.
    seed: per-request random seed; None draws one at random."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = (EOT_ID,)

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be an integer >= 0 (got {self.max_new_tokens!r})")
        if not _number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a number >= 0 (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            problems.append(f"seed must be an integer >= 0 (got {self.seed!r})")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be a list of non-empty strings (got {self.stop!r})")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be a list of integers (got {self.stop_token_ids!r})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits, seen: (B, V) float / bool; penalty: (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> (B,) token ids, row b sampled with params[b] and generators[b].

    Order as in Hugging Face generate: repetition penalty, temperature, top-k, top-p. Random
    rows draw one uniform number each from their own generator and invert the CDF, so a
    row's token depends only on its logits and its generator."""
    logits = logits.float()
    B, V = logits.shape
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=logits.device).unsqueeze(1)
        logits = apply_repetition_penalty(logits, seen[:B], penalty)
    tokens = logits.argmax(dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    sub = logits[rows] if len(rows) < B else logits
    ps = [params[b] for b in rows]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in ps], device=device).unsqueeze(1)
    sub = sub / temperature
    sorted_logits, order = torch.sort(sub, dim=-1, descending=True)
    rank = torch.arange(V, device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in ps], device=device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    if any(p.top_p < 1.0 for p in ps):
        probs = sorted_logits.softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in ps], device=device).unsqueeze(1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # Generators live on the CPU: a seed gives the same draws on every device.
    u = torch.cat([torch.rand(1, generator=generators[b]) for b in rows]).to(device).unsqueeze(1) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)
    pick = torch.where(probs.gather(1, pick) > 0, pick, torch.zeros_like(pick))  # rounding at the very end of the CDF
    chosen = order.gather(1, pick).squeeze(1)
    if len(rows) == B:
        return chosen
    tokens[torch.tensor(rows, device=device)] = chosen
    return tokens
