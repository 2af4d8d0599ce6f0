"""The maxent model's decoding state: the last n-1 tokens of each slot. A step costs the same at
any position (n-1 table look-ups), and gives exactly the logits of a full recomputation."""

from __future__ import annotations

import torch

from meshlm.model.maxent.model import BOUNDARY, MaxEntLM


class NgramDecodeState:
    """DecodeState (meshlm.model.spec) of a MaxEntLM, or of its tensor-parallel shard."""

    def __init__(self, model: MaxEntLM, max_batch: int, max_len: int):
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        device = next(model.parameters()).device
        self.history = torch.full((max_batch, model.history_length), BOUNDARY, dtype=torch.long, device=device)
        self.lengths = [0] * max_batch

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        for prompt, slot in zip(prompts, slots):
            ids = torch.tensor(prompt, dtype=torch.long, device=self.history.device)
            self.history[slot] = torch.cat([self.history[slot], ids])[-self.model.history_length :]
            self.lengths[slot] += len(prompt)
        return self.model.scores(self.history[slots])  # (n, V_local)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        self.history[:n] = torch.cat([self.history[:n, 1:], tokens.view(n, 1).to(self.history)], dim=1)
        for i in range(n):
            self.lengths[i] += 1
        return self.model.scores(self.history[:n])

    def release(self, slot: int) -> None:
        self.history[slot] = BOUNDARY
        self.lengths[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self.history[dst] = self.history[src]
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def nbytes(self) -> int:
        return self.history.numel() * self.history.element_size()
