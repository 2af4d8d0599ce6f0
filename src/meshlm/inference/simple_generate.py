"""A plain generation loop (full recompute per token): the reference the KV-cache engine
(`meshlm.inference.engine`) is tested against, and the small helper the trainer uses for
its end-of-run sample. Serving and the CLI use the engine."""

from __future__ import annotations

from collections.abc import Iterator

import tokenizers
import torch
from torch import nn

from meshlm.config import Config
from meshlm.inference.sampling import sample_next


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids one by one. The context is cropped to the model's max_seq_len."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids or [0]], dtype=torch.long, device=device)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:])[:, -1, :]
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(next_id.item())
        if token in stop_ids:
            return
        yield token
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)


def generate_text(
    model: nn.Module, tokenizer: tokenizers.Tokenizer, prompt: str, max_new_tokens: int = 64, **sampling
) -> str:
    out = list(generate_tokens(model, tokenizer.encode(prompt).ids, max_new_tokens, **sampling))
    return tokenizer.decode(out)


def end_of_run_sample(model: nn.Module, tokenizer: tokenizers.Tokenizer, cfg: Config) -> str:
    """The trainer's end-of-run sample (handed to it as a callback): the config's sample prompt
    continued by `train.sample_tokens` tokens, temperature 0.8, top-k 40, the run's seed."""
    prompt = cfg.train.sample_prompt
    return prompt + generate_text(
        model.eval(), tokenizer, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=40, seed=cfg.train.seed
    )
